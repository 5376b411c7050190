"""Normal-form rules of `moefuse.view.View` that no idiom test covers: `x * 1`, and what a body's
inputs are bound to outside (`View.outside`)::

    view = View(body, [Bound(lambda: outer_view, operand) for operand in eqn.invars])
    view.outside(body.jaxpr.invars[0])   # (outer_view, the operand in its normal form)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import moefuse
from moefuse import _compat as C
from moefuse import idioms
from moefuse.view import Bound, View

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)


def test_times_one_is_the_value_itself_of_its_own_type_only():
    def fn(x):
        return x * 1.0, 1.0 * x, x * 2.0, x.astype(jnp.bfloat16) * jnp.float32(1.0)

    closed = jax.make_jaxpr(fn)(X)
    view = View(closed)
    (x,) = closed.jaxpr.invars
    one, one_left, two, widened = closed.jaxpr.outvars
    assert view.canon(one) is x and view.canon(one_left) is x
    assert view.op(two) == "mul"
    assert view.op(widened) == "convert_element_type"  # bf16 * f32(1) is the bf16 value cast up


def test_a_complex_factor_is_never_read_as_a_float():
    """(1 + 2j) * z is not z: scalars are floats, and a complex constant has none."""
    z = jnp.ones((4,), jnp.complex64)
    closed = jax.make_jaxpr(lambda z: (z * jnp.complex64(1 + 2j), z * jnp.complex64(1)))(z)
    view = View(closed)
    tilted, one = closed.jaxpr.outvars
    assert view.op(tilted) == "mul" and view.op(one) == "mul"
    assert view.scalar(view.producer(tilted).invars[1]) is None


def test_outside_names_what_a_body_input_is_bound_to():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("e",))
    spec = jax.sharding.PartitionSpec()

    def fn(x):
        return jax.shard_map(lambda p: p * 2.0, mesh=mesh, in_specs=spec, out_specs=spec)(jax.nn.softmax(x))

    closed = jax.make_jaxpr(fn)(X)
    outer = View(closed)
    (sm,) = [e for e in closed.jaxpr.eqns if e.primitive.name in C.SHARD_MAP_NAMES]
    body = C.as_closed(sm.params["jaxpr"])
    inner = View(body, [Bound(lambda: outer, v) for v in sm.invars])
    (p,) = body.jaxpr.invars
    got_view, got = inner.outside(p)
    assert got_view is outer and got is outer.canon(sm.invars[0])
    assert idioms.softmax(outer, got) is not None  # inline, or jax 0.12's custom_jvp
    assert View(body).outside(p) is None  # nothing bound: a top-level input
    assert inner.outside(body.jaxpr.outvars[0]) is None  # not an input


def test_a_loop_body_is_not_bound_to_its_operands():
    """A scan body runs once per slice (and carries change), so its inputs are not the operands:
    the softmax outside is no evidence there, and the bare top_k inside stays unfused."""

    def fn(x):
        def step(c, row):
            v, i = lax.top_k(row, 2)
            return c, (v, i)

        return lax.scan(step, 0.0, jax.nn.softmax(x))[1]

    plan = moefuse.plan(fn, X)
    assert not plan.fused
    (d,) = [d for d in plan.declined if d.op == "route"]
    assert "nor where the body's caller computes it" in d.reason and d.path.startswith("scan")


def test_a_bool_cast_to_numbers_and_compared_back_is_the_bool():
    """b.astype(f) > 0, != 0, == 1, >= 1, 0 < ... are b (as `jnp.where(one_hot(ids, E) > 0, ...)` writes
    it); other comparisons (< 1, > 1, 0 > ...) and a cast of numbers that are not bools stay as written."""
    ids = jnp.asarray([[0, 2], [1, 3]], jnp.int32)

    def fn(ids):
        b = ids > 1
        f = b.astype(jnp.float32)
        i = b.astype(jnp.int32)
        same = (f > 0, f != 0, i == 1, f >= 1, 0 < f, 1 <= i)
        other = (f < 1, f > 1, 0 > f, ids.astype(jnp.float32) > 0)
        return b, same, other

    closed = jax.make_jaxpr(fn)(ids)
    view = View(closed)
    b, *rest = closed.jaxpr.outvars
    same, other = rest[:6], rest[6:]
    assert view.op(b) == "gt"
    for v in same:
        assert view.canon(v) is view.canon(b), view.producer(v)
    for v in other:
        assert view.canon(v) is not view.canon(b) and view.op(v) in ("lt", "gt"), view.producer(v)


def test_a_slice_of_everything_is_the_value_but_a_transpose_of_the_same_shape_is_not():
    def fn(x, sq):
        return lax.slice(x, (0, 0), (4, 8)), x[:, :7], sq.T

    closed = jax.make_jaxpr(fn)(X, jnp.ones((3, 3)))
    view = View(closed)
    x, sq = closed.jaxpr.invars
    whole, part, transposed = closed.jaxpr.outvars
    assert view.canon(whole) is x
    assert view.op(part) == "slice" and view.op(transposed) == "transpose"


def test_a_broadcast_of_a_broadcast_constant_has_its_value():
    """vmap adds a batch dim to the zeros a loop starts from: zeros [8, 16] broadcast to [1, 8, 16] is
    still the splat 0 (and ones stay 1, a non-splat constant has no single value)."""

    def seq(h):
        ramp = np.arange(16.0, dtype=np.float32)
        return jnp.zeros_like(h), jnp.ones_like(h), jnp.broadcast_to(ramp, h.shape)

    closed = jax.make_jaxpr(jax.vmap(lambda h: tuple(o + h for o in seq(h))))(jnp.ones((2, 8, 16)))
    view = View(closed)
    adds = [e for e in closed.jaxpr.eqns if e.primitive.name == "add"]
    consts = [next(v for v in e.invars if view.op(v) == "broadcast_in_dim") for e in adds[-3:]]
    assert [c.aval.shape for c in consts] == [(1, 8, 16)] * 3
    assert [view.scalar(c) for c in consts] == [0.0, 1.0, None]
    np.testing.assert_array_equal(view.value(consts[2])[0, 3], np.arange(16.0))


def test_a_row_major_flattening_is_read_through_reshape_squeeze_and_expand_dims_only():
    """ids.reshape(-1), ids[:, 0] of ids [T, 1] and ids[None] keep the row-major order: each is read as
    ids reshaped; a reshape with `dimensions` (a transpose first) and a transpose are not."""
    ids = jnp.zeros((4, 1), jnp.int32)

    def fn(ids):
        return (ids.reshape(-1), ids[:, 0], ids[None], lax.reshape(ids, (4,), dimensions=(1, 0)),
                ids.T.reshape(-1), ids + 1)

    closed = jax.make_jaxpr(fn)(ids)
    view = View(closed)
    (x,) = closed.jaxpr.invars
    flat, squeezed, expanded, dims_given, transposed, added = closed.jaxpr.outvars
    assert view.reshaped_from(flat) is x
    assert view.reshaped_from(squeezed) is x
    assert view.reshaped_from(expanded) is x
    assert view.reshaped_from(dims_given) is None
    assert view.reshaped_from(transposed) is not x
    assert view.reshaped_from(added) is None
