"""Unit tests of the canonical view and idiom raising, on jaxprs of small spellings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from moefuse import idioms
from moefuse.rewrite import inline_jits
from moefuse.view import View

X = jnp.ones((4, 8), jnp.float32)


def view_of(fn, *args) -> tuple[View, list]:
    closed = inline_jits(jax.make_jaxpr(fn)(*args))
    return View(closed), closed.jaxpr.outvars


@jax.custom_jvp
def custom_softmax(x):
    e = jnp.exp(x - lax.stop_gradient(x.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


custom_softmax.defjvp(lambda p, t: (custom_softmax(p[0]), t[0]))


@pytest.mark.parametrize(
    "spelling",
    [
        lambda x: jax.nn.softmax(x, axis=-1),
        lambda x: jax.nn.softmax(x, axis=1),
        lambda x: (
            jnp.exp(x - x.max(-1, keepdims=True))
            / jnp.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
        ),
        lambda x: jnp.exp(jax.nn.log_softmax(x, axis=-1)),
        custom_softmax,
    ],
    ids=["jax.nn", "axis=1", "inline", "exp_log_softmax", "custom_jvp"],
)
def test_softmax_spellings_raise_to_one_idiom(spelling):
    view, (out,) = view_of(spelling, X)
    sm = idioms.softmax(view, out)
    assert sm is not None and sm.axis == 1
    assert view.op(sm.operand) == "input"


def test_softmax_over_other_axis_binds_that_axis():
    view, (out,) = view_of(lambda x: jax.nn.softmax(x, axis=0), X)
    assert idioms.softmax(view, out).axis == 0


@pytest.mark.parametrize(
    "not_softmax",
    [
        lambda x: jnp.exp(x) / jnp.exp(x).sum(0, keepdims=True).sum(1, keepdims=True),
        lambda x: jnp.exp(x - x.max(-1, keepdims=True)) / jnp.exp(x).sum(-1, keepdims=True),
        lambda x: jax.nn.sigmoid(x),
        lambda x: x / x.sum(-1, keepdims=True),
    ],
    ids=["total_sum", "mismatched_exp", "sigmoid", "plain_normalise"],
)
def test_softmax_near_misses_are_not_raised(not_softmax):
    view, (out,) = view_of(not_softmax, X)
    assert idioms.softmax(view, out) is None


def test_sigmoid_and_log_softmax():
    view, outs = view_of(lambda x: (jax.nn.sigmoid(x), jax.nn.log_softmax(x)), X)
    assert view.op(idioms.sigmoid(view, outs[0])) == "input"
    assert idioms.log_softmax(view, outs[1]).axis == 1


def test_take_along_axis_both_spellings_and_take():
    ids = jnp.zeros((4, 2), jnp.int32)
    vec = jnp.ones((8,))

    def fn(x, ids, vec):
        i = lax.top_k(x, 2)[1]
        a = jnp.take_along_axis(x, i, axis=-1)
        b = x[jnp.arange(4)[:, None], i]
        c = jnp.take(vec, i)
        d = vec[i]
        return a, b, c, d

    view, outs = view_of(fn, X, ids, vec)
    for out in outs[:2]:
        arr, idx = idioms.take_along_axis(view, out)
        assert view.op(arr) == "input" and view.op(idx) == "top_k"
    for out in outs[2:]:
        v, idx = idioms.take(view, out)
        assert view.op(v) == "input" and view.op(idx) == "top_k"


def test_one_hot_and_argsort():
    ids = jnp.zeros((4, 2), jnp.int32)
    view, outs = view_of(lambda i, x: (jax.nn.one_hot(i, 8), jnp.argsort(x, axis=-1)), ids, X)
    got_ids, n = idioms.one_hot(view, outs[0])
    assert n == 8 and view.op(got_ids) == "input"
    keys, axis = idioms.argsort(view, outs[1])
    assert axis == 1 and view.op(keys) == "input"


def test_reduction_keepdims_must_broadcast_back_along_the_reduced_axis():
    sq = jnp.ones((8, 8))
    view, outs = view_of(
        lambda x: (x.sum(-1, keepdims=True), jnp.broadcast_to(x.sum(-1)[None, :], (8, 8))), sq
    )
    assert idioms.reduction(view, outs[0], "sum")[1] == (1,)
    # the row sums laid along the wrong dimension are not "sum over axis 1, kept"
    assert idioms.reduction(view, outs[1], "sum") is None


def test_view_folds_noops_and_index_normalisation():
    def fn(x):
        v, i = lax.top_k(x, 2)
        i2 = jnp.where(i < 0, i + 8, i)  # what jnp indexing emits
        y = lax.stop_gradient(x.astype(jnp.float32).reshape(4, 8))
        return i2, y

    view, (i2, y) = view_of(fn, X)
    assert view.op(i2) == "top_k" and view.out_index(i2) == 1
    assert view.op(y) == "stop_gradient"
    assert view.op(y, through_stop_gradient=True) == "input"


def test_view_scalar_of_literals_and_splats():
    view, outs = view_of(lambda x: (x * 2.5, jnp.full((4, 8), -jnp.inf) + x), X)
    mul = view.producer(outs[0])
    assert view.scalar(mul.invars[1]) == 2.5
    add = view.producer(outs[1])
    assert view.scalar(add.invars[0]) == float("-inf")
    assert view.scalar(add.invars[1]) is None


def test_take_along_axis_with_a_size_one_leading_dim():
    """jnp.take_along_axis keeps a size-1 dim as an offset dim instead of batching it: same idiom."""

    def fn(s):
        ids = lax.top_k(s, 2)[1]
        return jnp.take_along_axis(s, ids, axis=-1), jnp.take_along_axis(s, ids[:, :, :1], axis=1)

    view, outs = view_of(fn, jnp.ones((1, 4, 8)))
    arr, idx = idioms.take_along_axis(view, outs[0])
    assert view.op(arr) == "input" and view.op(idx) == "top_k"
    # along the token axis (1), not the last: not a take along the expert axis
    assert idioms.take_along_axis(view, outs[1]) is None


@pytest.mark.parametrize(
    "spelling",
    [lambda x: jnp.exp(x - jax.nn.logsumexp(x, axis=-1, keepdims=True)), lambda x: 1.0 / (1.0 + jnp.exp(-x))],
    ids=["exp_minus_logsumexp", "one_over_one_plus_exp"],
)
def test_spelled_out_softmax_and_sigmoid(spelling):
    view, (out,) = view_of(spelling, X)
    got = idioms.softmax(view, out) or idioms.sigmoid(view, out)
    operand = got.operand if isinstance(got, idioms.Softmax) else got
    assert view.op(operand) == "input"


@pytest.mark.parametrize(
    "not_it",
    [
        lambda x: jnp.exp(x - jax.nn.logsumexp(x * 2.0, axis=-1, keepdims=True)),  # lse of another array
        lambda x: 1.0 / (2.0 + jnp.exp(-x)),
        lambda x: 1.0 / (1.0 + jnp.exp(x)),  # sigmoid(-x)
    ],
    ids=["lse_of_other", "two_plus", "sigmoid_of_minus_x"],
)
def test_spelled_out_near_misses(not_it):
    view, (out,) = view_of(not_it, X)
    assert idioms.softmax(view, out) is None and idioms.sigmoid(view, out) is None


def test_repeated_rows_is_jnp_repeat_along_rows_only():
    x3 = jnp.ones((4, 2, 8), jnp.float32)
    view, outs = view_of(
        lambda x, y: (
            jnp.repeat(x, 3, axis=0),  # row i is x[i // 3]
            jnp.tile(x, (3, 1)),  # row i is x[i % 4]
            jnp.repeat(x, 2, axis=1).reshape(8, 8),  # rows are halves of tokens
            jnp.repeat(y, 3, axis=0),  # 3-D: rows of [2, 8] blocks
        ),
        X,
        x3,
    )
    got, k = idioms.repeated_rows(view, outs[0])
    assert k == 3 and view.op(got) == "input" and got.aval.shape == (4, 8)
    assert idioms.repeated_rows(view, outs[1]) is None
    assert idioms.repeated_rows(view, outs[2]) is None
    got, k = idioms.repeated_rows(view, outs[3])
    assert k == 3 and got.aval.shape == (4, 2, 8)


def test_product_flattens_any_association_and_folds_constants():
    def fn(x, y):
        return (0.5 * x) * y, x * (y * 0.5), -(x * y) / -2.0, x * 3.0, jnp.tanh(x)

    closed = jax.make_jaxpr(fn)(jnp.ones(3), jnp.ones(3))
    view = View(closed)
    x, y = closed.jaxpr.invars
    a, b, c, d, t = closed.jaxpr.outvars
    for v in (a, b, c):
        p = idioms.product(view, v)
        assert p.coef == 0.5 and sorted(map(id, p.factors)) == sorted(map(id, (x, y))), p
    assert idioms.product(view, d) == idioms.Product(3.0, (x,))
    assert idioms.product(view, t) == idioms.Product(1.0, (view.canon(t),))


def test_take_rows_along_binds_whole_rows_picked_along_an_axis():
    y = jnp.arange(4 * 8 * 3, dtype=jnp.float32).reshape(4, 8, 3)

    def fn(y, p):
        _, ids = lax.top_k(p, 2)  # [4, 2], known non-negative (no wrap-around of negative indices)
        picked = jnp.take_along_axis(y, ids[:, :, None], axis=1)  # [4, 2, 3]
        last = jnp.take_along_axis(y[:, :, 0], ids, axis=1)  # a pick along the last axis: no rows
        first = jnp.take_along_axis(y, ids[:, :1, None], axis=0)  # along axis 0, not per batch position
        return picked, last, first, ids

    closed = inline_jits(jax.make_jaxpr(fn)(y, jnp.ones((4, 8))))
    view = View(closed)
    picked, last, first, ids = closed.jaxpr.outvars
    assert idioms.take_rows_along(view, picked) == (closed.jaxpr.invars[0], view.canon(ids), 1)
    assert idioms.take_rows_along(view, last) is None and idioms.take_rows_along(view, first) is None


def test_indices_below_knows_top_k_argmax_and_iota_bounds():
    def fn(p):
        _, ids = lax.top_k(p, 2)
        am = jnp.argmax(p, axis=-1)
        both = jnp.concatenate([ids, am[:, None]], axis=1)
        return ids, am, both, jnp.arange(8), ids + 1, ids.astype(jnp.float32).astype(jnp.int32)

    closed = inline_jits(jax.make_jaxpr(fn)(jnp.ones((3, 8))))
    view = View(closed)
    ids, am, both, iota, shifted, recast = closed.jaxpr.outvars
    for v in (ids, am, both, iota):
        assert idioms.indices_below(view, v, 8) and not idioms.indices_below(view, v, 7)
    assert not idioms.indices_below(view, shifted, 9) and not idioms.indices_below(view, recast, 8)


def test_an_argsort_permutes_an_iota_so_its_indices_are_bounded_and_non_negative():
    """An argsort (ascending, or descending: reversed around the sort) holds a permutation of
    arange(n): below n and >= 0; the sorted keys of the same sort are not indices."""

    def fn(p):
        return jnp.argsort(p, axis=-1), jnp.argsort(p, axis=-1, descending=True)[:, :2], jnp.sort(p, -1)

    closed = inline_jits(jax.make_jaxpr(fn)(jnp.ones((3, 8), jnp.int32)))
    view = View(closed)
    up, down, keys = closed.jaxpr.outvars
    for v in (up, down):
        assert idioms.indices_below(view, v, 8) and not idioms.indices_below(view, v, 7)
        assert view.is_nonneg_index(v)
    assert not idioms.indices_below(view, keys, 8) and not view.is_nonneg_index(keys)


def test_descending_argsort_is_read_with_its_axis_and_keys_only_when_reversed_around_a_stable_sort():
    def fn(p):
        reversed_ascending = jnp.argsort(p, axis=-1)[:, ::-1]  # ties to the higher index: not descending
        return jnp.argsort(p, axis=-1, descending=True), jnp.argsort(p, axis=0, descending=True), \
            reversed_ascending, jnp.argsort(-p, axis=-1)

    closed = inline_jits(jax.make_jaxpr(fn)(X))
    view = View(closed)
    (x,) = closed.jaxpr.invars
    last, first, reversed_ascending, of_negated = closed.jaxpr.outvars
    assert idioms.descending_argsort(view, last) == (x, 1)
    assert idioms.descending_argsort(view, first) == (x, 0)
    assert idioms.descending_argsort(view, reversed_ascending) is None
    assert idioms.descending_argsort(view, of_negated) is None


def test_inverse_permutation_by_argsort_or_by_scatter_of_positions():
    def fn(ids):
        perm = jnp.argsort(ids)
        n = perm.shape[0]
        by_argsort = jnp.argsort(perm)
        by_scatter = jnp.zeros_like(perm).at[perm].set(jnp.arange(n))
        not_positions = jnp.zeros_like(perm).at[perm].set(jnp.arange(n) * 2)
        not_a_permutation = jnp.zeros_like(perm).at[ids].set(jnp.arange(n))
        return perm, by_argsort, by_scatter, not_positions, not_a_permutation

    closed = inline_jits(jax.make_jaxpr(fn)(jnp.asarray([3, 1, 2, 1, 0, 3], jnp.int32)))
    view = View(closed)
    perm, by_argsort, by_scatter, not_positions, not_a_permutation = closed.jaxpr.outvars
    for inv in (by_argsort, by_scatter):
        assert idioms.inverse_permutation(view, inv) is view.canon(perm)
        assert view.is_nonneg_index(inv)  # so `sorted_rows[inv]` needs no wrap-around of negative indices
    assert idioms.inverse_permutation(view, not_positions) is None
    assert idioms.inverse_permutation(view, not_a_permutation) is None


IDS3 = jnp.array([[0, 2, 1], [3, 1, 0], [2, 2, 3], [1, 0, 2]], jnp.int32)
W3 = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 12


def _unrolled(term, k=3, order=None):
    """fn(ids, w) = sum over j (in `order`) of term(ids, w, j), written out as the program adds it."""

    def fn(ids, w):
        acc = jnp.zeros((ids.shape[0],), w.dtype)
        for j in order or range(k):
            acc = acc + term(ids, w, j)
        return acc

    return fn


@pytest.mark.parametrize(
    "fn",
    [
        _unrolled(lambda ids, w, j: jnp.where(ids[:, j] == 2, w[:, j], 0.0)),
        _unrolled(lambda ids, w, j: w[:, j] * (ids[:, j] == 2).astype(w.dtype), order=(2, 0, 1)),
        _unrolled(lambda ids, w, j: jnp.where(2 == ids[:, j], w[:, j], 0.0)),  # commuted eq
    ],
    ids=["where", "mul_any_order", "commuted"],
)
def test_column_sum_reads_the_sum_written_out_over_the_k_columns(fn):
    view, (out,) = view_of(fn, IDS3, W3)
    got = idioms.column_sum(view, out)
    assert got is not None and got.k == 3
    assert set(got.arrays.values()) == set(view.jaxpr.invars)  # the columns of ids and of w
    # the term of column 0, and each of its column reads -> the array it reads column 0 of
    assert {idioms.column(view, r) for r in got.arrays} == {(a, 0) for a in view.jaxpr.invars}


def test_column_sum_keeps_values_shared_by_every_term():
    c = jnp.ones((4,), jnp.float32)
    fn = lambda ids, w, c: sum(jnp.where(ids[:, j] == 1, w[:, j] * c, 0.0) for j in range(3))  # noqa: E731
    view, (out,) = view_of(fn, IDS3, W3, c)
    got = idioms.column_sum(view, out)
    assert got is not None and got.k == 3 and len(got.arrays) == 2


@pytest.mark.parametrize(
    "fn",
    [
        _unrolled(lambda ids, w, j: jnp.where(ids[:, j] == 2, w[:, j], 0.0), k=2),  # a column missing
        _unrolled(lambda ids, w, j: jnp.where(ids[:, j] == 2, w[:, j], 0.0), order=(0, 1, 1)),  # twice
        _unrolled(lambda ids, w, j: jnp.where(ids[:, 0] == 2, w[:, j], 0.0)),  # ids column 0 in every term
        _unrolled(lambda ids, w, j: jnp.where(ids[:, j] == 2, w[:, (j + 1) % 3], 0.0)),  # w shifted
        _unrolled(lambda ids, w, j: jnp.where(ids[:, j] == j, w[:, j], 0.0)),  # another f per term
        _unrolled(lambda ids, w, j: jnp.where(ids[:, j] == 2, w[:, j], 0.0) if j else w[:, 0]),
    ],
    ids=["missing", "repeated", "fixed_ids_column", "shifted_w", "other_fn", "other_term"],
)
def test_column_sum_near_misses(fn):
    view, (out,) = view_of(fn, IDS3, W3)
    assert idioms.column_sum(view, out) is None


def test_column_reads_a_column_along_the_last_axis_only():
    view, outs = view_of(lambda a: (a[:, 1], a[1, :], a[:, 0:2][:, 1], a[:, 1:2]), W3)
    assert idioms.column(view, outs[0]) == (view.jaxpr.invars[0], 1)
    assert idioms.column(view, outs[1]) is None  # a row
    sliced, j = idioms.column(view, outs[2])  # column 1 of the [4, 2] slice, not of the input
    assert j == 1 and view.op(sliced) == "slice"
    assert idioms.column(view, outs[3]) is None  # not squeezed


def test_column_sum_of_deeply_shared_terms_is_read_in_linear_time():
    """Each term reuses its values (h = h * h - h, 60 times: 2**60 paths): read without walking paths."""

    def term(ids, w, j):
        h = w[:, j]
        for _ in range(60):
            h = h * h - h
        return h

    view, (out,) = view_of(_unrolled(term), IDS3, W3)
    got = idioms.column_sum(view, out)
    assert got is not None and got.k == 3


def test_pair_rows_is_the_token_of_each_row_major_token_slot_pair():
    """i // k at position i: `arange(T * k) // k` and `repeat(arange(T), k)` (k read off); not a
    slot-major pairing (i % T), a shifted one, or a division of something other than an iota."""
    t, k = 6, 3

    def fn(v):
        n = jnp.arange(t * k)
        return n // k, jnp.repeat(jnp.arange(t), k), n % t, (n + 1) // k, v // k

    closed = inline_jits(jax.make_jaxpr(fn)(jnp.arange(t * k)))
    view = View(closed)
    floor_div, repeated, slot_major, shifted, of_input = closed.jaxpr.outvars
    assert idioms.pair_rows(view, floor_div) == k and idioms.pair_rows(view, repeated) == k
    for v in (slot_major, shifted, of_input):
        assert idioms.pair_rows(view, v) is None


def test_masked_at_choice_reads_a_fill_of_exactly_the_value_asked_at_a_top_k_mask():
    """where(mask, s, fill) with the mask true exactly at the top-k ids: fill +0.0 by default, -inf when
    asked; -0.0, another fill, or a mask of ids that may repeat (not a top_k's) are not read."""

    def fn(s, other_ids):
        _, ids = lax.top_k(s, 2)
        mask = jax.nn.one_hot(ids, 8).sum(-2) > 0
        loose = jax.nn.one_hot(other_ids, 8).sum(-2) > 0
        return (jnp.where(mask, s, 0.0), jnp.where(mask, s, -jnp.inf), jnp.where(mask, s, -0.0),
                jnp.where(mask, s, -1e9), jnp.where(loose, s, 0.0), ids)

    closed = inline_jits(jax.make_jaxpr(fn)(X, jnp.zeros((4, 2), jnp.int32)))
    view = View(closed)
    s = closed.jaxpr.invars[0]
    zero, neg_inf, neg_zero, finite, loose, ids = closed.jaxpr.outvars
    assert idioms.masked_at_choice(view, zero) == (s, view.canon(ids))
    assert idioms.masked_at_choice(view, neg_inf, fill=float("-inf")) == (s, view.canon(ids))
    assert idioms.masked_at_choice(view, neg_inf) is None
    for v in (neg_zero, finite, loose):
        assert idioms.masked_at_choice(view, v) is None


def test_renormalised_is_a_row_divided_by_its_own_total_over_the_last_axis():
    def fn(m, other):
        return (m / m.sum(-1, keepdims=True), m / m.sum(0, keepdims=True), m / other.sum(-1, keepdims=True),
                m / (m.sum(-1, keepdims=True) + 1e-9))

    closed = inline_jits(jax.make_jaxpr(fn)(X, X))
    view = View(closed)
    m = closed.jaxpr.invars[0]
    own, over_tokens, other_total, with_eps = closed.jaxpr.outvars
    assert idioms.renormalised(view, own) is m
    for v in (over_tokens, other_total, with_eps):
        assert idioms.renormalised(view, v) is None
