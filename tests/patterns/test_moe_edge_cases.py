"""Edge cases of the `moe` rewrite, run as whole programs: `moefuse.jit(block)` against `jax.jit(block)`.

Four spellings of one MoE block (dense all-expert einsum + one_hot combine, per-token `w[ids]`
gather, sorted `lax.ragged_dot`, Python loop over experts), each returning `(out, ids)` so that
expert ids (tie order included) are compared exactly. Every test first checks with `moefuse.plan`
that the block really fused as `moe` (else it would compare the original with itself), then
checks a precondition on the inputs (the tie, the inf, the empty expert really is there).

Cases: all tokens on one expert, experts without tokens, k = 1, k = E, T = 1, exact ties in the
router scores, NaN and +-inf router logits, and gradients. Router inputs are dyadic (multiples
of 1/8, small), so logits are exact in f32 whatever the accumulation order: ties are real ties.

The one documented difference (a dense spelling's non-routed expert with inf/NaN *weights*
poisons the original but not the fused op) is not exercised: non-finite values here are only in
router logits, where the fused program must give exactly the original's result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse

D, F = 16, 32
SPELLINGS = ("dense", "gather", "sorted", "loop")


# ---------------------------------------------------------------------------------------------
# the blocks, written the way model authors write them
# ---------------------------------------------------------------------------------------------


def _router(kind, k):
    def softmax_topk_renorm(x, router_w):  # Mixtral / Qwen3 with norm_topk_prob
        logits = x @ router_w
        probs = jax.nn.softmax(logits, axis=-1)
        w, ids = lax.top_k(probs, k)
        return w / jnp.sum(w, axis=-1, keepdims=True), ids

    def sigmoid_topk_gather(x, router_w):  # DeepSeek-V3 without groups or bias
        scores = jax.nn.sigmoid(x @ router_w)
        _, ids = lax.top_k(scores, k)
        w = jnp.take_along_axis(scores, ids, axis=-1)
        return w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20), ids

    def topk_then_softmax(x, router_w):  # MaxText / GPT-OSS: softmax over the k kept logits
        top_logits, ids = lax.top_k(x @ router_w, k)
        return jax.nn.softmax(top_logits, axis=-1), ids

    return {
        "softmax": softmax_topk_renorm,
        "sigmoid": sigmoid_topk_gather,
        "topk_softmax": topk_then_softmax,
    }[kind]


def make_block(spelling, k, router="softmax"):
    """block(x [T, D], router_w [D, E], w_gate, w_up [E, D, F], w_down [E, F, D]) -> (out [T, D], ids)."""
    route = _router(router, k)

    def dense(x, router_w, w_gate, w_up, w_down):
        w, ids = route(x, router_w)
        combine = jnp.sum(jax.nn.one_hot(ids, router_w.shape[1], dtype=w.dtype) * w[..., None], axis=1)
        gate = jnp.einsum("td,edf->tef", x, w_gate)
        up = jnp.einsum("td,edf->tef", x, w_up)
        expert_out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, w_down)
        return jnp.einsum("ted,te->td", expert_out, combine), ids

    def gather(x, router_w, w_gate, w_up, w_down):
        w, ids = route(x, router_w)
        g = jnp.einsum("td,tkdf->tkf", x, w_gate[ids])
        u = jnp.einsum("td,tkdf->tkf", x, w_up[ids])
        y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, w_down[ids])
        return jnp.einsum("tkd,tk->td", y, w), ids

    def sorted_ragged(x, router_w, w_gate, w_up, w_down):
        w, ids = route(x, router_w)
        flat = ids.reshape(-1)
        perm = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=router_w.shape[1])
        xs = x[perm // k]
        h = jax.nn.silu(lax.ragged_dot(xs, w_gate, sizes)) * lax.ragged_dot(xs, w_up, sizes)
        y = lax.ragged_dot(h, w_down, sizes)
        y = y[jnp.argsort(perm)].reshape(-1, k, x.shape[-1])
        return jnp.sum(y * w[..., None], axis=1), ids

    def loop(x, router_w, w_gate, w_up, w_down):
        w, ids = route(x, router_w)
        out = jnp.zeros_like(x)
        for e in range(router_w.shape[1]):
            w_e = jnp.sum(jnp.where(ids == e, w, 0.0), axis=-1)
            y_e = (jax.nn.silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]
            out = out + w_e[:, None] * y_e
        return out, ids

    return {"dense": dense, "gather": gather, "sorted": sorted_ragged, "loop": loop}[spelling]


# ---------------------------------------------------------------------------------------------
# inputs and checks
# ---------------------------------------------------------------------------------------------


def _dyadic(rng, shape, lim=2.0):
    """Multiples of 1/8 in [-lim, lim]: products and sums of a few stay exact in f32."""
    return np.clip(np.round(rng.standard_normal(shape) * 4) / 8, -lim, lim).astype(np.float32)


def make_args(t=8, e=8, seed=0):
    """(x, router_w, w_gate, w_up, w_down) as numpy f32; x and router_w dyadic."""
    rng = np.random.default_rng(seed)
    x = _dyadic(rng, (t, D))
    router_w = _dyadic(rng, (D, e))
    w_gate = (rng.standard_normal((e, D, F)) * D**-0.5).astype(np.float32)
    w_up = (rng.standard_normal((e, D, F)) * D**-0.5).astype(np.float32)
    w_down = (rng.standard_normal((e, F, D)) * F**-0.5).astype(np.float32)
    return [x, router_w, w_gate, w_up, w_down]


def logits_of(args):
    """The router logits in float64 (exact for dyadic inputs; inf/NaN as IEEE arithmetic gives them)."""
    x, router_w = (np.asarray(a, np.float64) for a in args[:2])
    with np.errstate(invalid="ignore"):
        return np.einsum("td,de->tde", x, router_w).sum(1)


def assert_fused_as_moe(fn, args, k, num_experts):
    plan = moefuse.plan(fn, *args)
    sites = [s for s in plan.fused if s.op == "moe"]
    assert len(sites) == 1, str(plan)
    assert sites[0].params["k"] == k and sites[0].params["num_experts"] == num_experts, str(plan)


@functools.cache
def programs(spelling, k, router):
    """(block, jax.jit(block), moefuse.jit(block)), shared by the tests (compiles are the cost here)."""
    fn = make_block(spelling, k, router)
    return fn, jax.jit(fn), moefuse.jit(fn)


def run_both(spelling, k, args, router="softmax"):
    """Fusion check, then (want, got) as numpy: ((out, ids) of jax.jit, (out, ids) of moefuse.jit)."""
    fn, original, fused = programs(spelling, k, router)
    args = [jnp.asarray(a) for a in args]
    assert_fused_as_moe(fn, args, k, args[1].shape[1])
    want, got = original(*args), fused(*args)
    return tuple(map(np.asarray, want)), tuple(map(np.asarray, got))


def assert_same(want, got):
    """ids exactly; NaN and +-inf in the same places; finite values within verify's f32 tolerance."""
    (w_out, w_ids), (g_out, g_ids) = want, got
    assert g_ids.dtype == w_ids.dtype
    np.testing.assert_array_equal(g_ids, w_ids, err_msg="expert ids (tie order included) differ")
    np.testing.assert_array_equal(np.isnan(g_out), np.isnan(w_out), err_msg="NaN positions differ")
    np.testing.assert_array_equal(np.isposinf(g_out), np.isposinf(w_out), err_msg="+inf positions differ")
    np.testing.assert_array_equal(np.isneginf(g_out), np.isneginf(w_out), err_msg="-inf positions differ")
    np.testing.assert_allclose(g_out, w_out, rtol=1e-5, atol=1e-6, equal_nan=True)


def bump(args, experts, value=8.0):
    """Every token's logit of `experts` raised by `value` (x[:, 0] = 1, router_w[0, experts] = value)."""
    x, router_w = args[0].copy(), args[1].copy()
    x[:, 0] = 1.0
    router_w[0, :] = 0.0
    router_w[0, list(experts)] = value
    return [x, router_w, *args[2:]]


# ---------------------------------------------------------------------------------------------
# routing extremes (k = 1 and k = E, with gradients, are further down)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_token_on_one_expert(spelling):
    """k = 2 and every token's first choice is the last expert: 16 rows on one expert of 8, more
    than an even share's capacity."""
    args = bump(make_args(t=16), [7])
    want, got = run_both(spelling, 2, args)
    assert (want[1][:, 0] == 7).all(), want[1]
    assert_same(want, got)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_experts_without_tokens(spelling):
    """k = 2, every token on experts {2, 5}: the first, last and four middle experts are empty."""
    args = bump(make_args(t=16, seed=7), [2, 5])
    want, got = run_both(spelling, 2, args)
    assert (np.sort(want[1], 1) == [2, 5]).all(), want[1]
    assert_same(want, got)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_single_token(spelling):
    args = make_args(t=1, seed=2)
    want, got = run_both(spelling, 2, args)
    assert_same(want, got)


# ---------------------------------------------------------------------------------------------
# ties and non-finite router logits (k = 4 of 8, T = 16: both tests share one program per case)
# ---------------------------------------------------------------------------------------------

# Each spelling with the softmax router; the other two routers (whose ids and weights reach the
# `moe` op by other paths: a take_along_axis gather, a softmax over k) on one spelling each, to
# bound the time (each case is a compile of both programs).
ROUTER_CASES = [(s, "softmax") for s in SPELLINGS] + [("loop", "sigmoid"), ("sorted", "topk_softmax")]


def tied_args():
    """Experts 1, 5, 6 have identical router columns and the largest logits, experts 0, 3, 7 the
    next largest, identical too: top-4 takes the first three-way tie whole and splits the second.
    Token 0 is all zeros (an eight-way tie of zero logits)."""
    args = make_args(t=16, seed=3)
    x, router_w = args[0], args[1]
    router_w[:, 5] = router_w[:, 6] = router_w[:, 1]
    router_w[:, 3] = router_w[:, 7] = router_w[:, 0]
    x[:, 0] = 1.0
    router_w[0, :] = 0.0
    router_w[0, [1, 5, 6]] = 16.0
    router_w[0, [0, 3, 7]] = 8.0
    x[0] = 0.0
    return args


@pytest.mark.parametrize("spelling, router", ROUTER_CASES)
def test_exact_ties_in_router_scores(spelling, router):
    args = tied_args()
    logits = logits_of(args)
    assert (logits[:, [5, 6]] == logits[:, [1]]).all() and (logits[:, [3, 7]] == logits[:, [0]]).all()
    assert (logits[0] == 0).all()
    want, got = run_both(spelling, 4, args, router)
    np.testing.assert_array_equal(want[1][0], [0, 1, 2, 3])  # lowest index first
    np.testing.assert_array_equal(want[1][1:], np.broadcast_to([1, 5, 6, 0], (15, 4)))
    assert_same(want, got)


# (x[t, 0], x[t, 1]) per token: router_w[0] is +inf on experts 0, 1; router_w[1] is -inf on 2, 5, 7.
#   (-1, 1): -inf on 0 1 2 5 7 (finite 3 4 6)   (1, -1): +inf on 0 1 2 5 7 (a five-way tie of +inf)
#   (1, 1): +inf on 0 1, -inf on 2 5 7           (-1, -1): -inf on 0 1, +inf on 2 5 7
#   (0, 1): NaN on 0 1, -inf on 2 5 7            (0, 0): NaN on 0 1 2 5 7      (1, 0): +inf, NaN
# With k = 4 the ties of -inf (first kind) and of +inf (second kind) straddle the top-k cut.
NONFINITE_TOKENS = [(-1, 1), (1, -1), (1, 1), (-1, -1), (0, 1), (0, 0), (1, 0), (-1, 1)] * 2


def nonfinite_args():
    args = make_args(t=len(NONFINITE_TOKENS), seed=4)
    x, router_w = args[0], args[1]
    x[:, :2] = NONFINITE_TOKENS
    router_w[:2, :] = 0.0
    router_w[0, [0, 1]] = np.inf
    router_w[1, [2, 5, 7]] = -np.inf
    return args


@pytest.mark.parametrize("spelling, router", ROUTER_CASES)
def test_nan_and_inf_in_router_logits(spelling, router):
    args = nonfinite_args()
    logits = logits_of(args)
    assert np.isnan(logits).any() and np.isposinf(logits).any() and np.isneginf(logits).any()
    want, got = run_both(spelling, 4, args, router)
    rows_nan = np.isnan(want[0]).any(1)
    assert rows_nan.any() and not rows_nan.all(), "the original should have finite and NaN rows"
    assert_same(want, got)


# ---------------------------------------------------------------------------------------------
# k = 1 on one expert, and k = E: values, ids and gradients through the fused block
# ---------------------------------------------------------------------------------------------


def _loss(fn):
    def loss(*args):
        out, ids = fn(*args)
        weights = jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))
        return jnp.sum(out * weights), (out, ids)

    return loss


GRAD_CASES = {
    # k = 1, every token on expert 3 (16 rows on one expert; the other 7 get none)
    "one_expert_k1": (1, lambda: bump(make_args(t=16, seed=5), [3], value=4.0)),
    "k_equals_e": (4, lambda: make_args(e=4, seed=6)),
}
ARG_NAMES = ("x", "router_w", "w_gate", "w_up", "w_down")


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize(
    # k = E in the slow tier (~10 s per spelling on 2 cores); one_expert_k1 stays in the default run
    "case", [pytest.param("k_equals_e", marks=pytest.mark.slow), "one_expert_k1"]
)
def test_values_and_grads(spelling, case):
    """(out, ids) and d loss / d (x, router_w, w_gate, w_up, w_down) equal the original's."""
    k, make = GRAD_CASES[case]
    args = [jnp.asarray(a) for a in make()]
    fn = make_block(spelling, k)
    assert_fused_as_moe(fn, args, k, args[1].shape[1])
    argnums = tuple(range(5))

    @jax.jit
    def both(*args):  # one compile for the two programs
        def vg(f):
            return jax.value_and_grad(_loss(f), argnums, has_aux=True)(*args)

        return vg(fn), vg(moefuse.fuse(fn))

    ((_, want), want_grads), ((_, got), got_grads) = jax.tree_util.tree_map(np.asarray, both(*args))
    if case == "one_expert_k1":
        assert (want[1] == 3).all(), want[1]
        # only expert 3 gets weight gradients (else equal gradients would prove little)
        assert np.abs(want_grads[2][3]).max() > 0 and not np.delete(want_grads[2], 3, axis=0).any()
    else:
        assert (np.sort(want[1], 1) == np.arange(4)).all()
    assert_same(want, got)
    for name, g, w in zip(ARG_NAMES, got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"d loss / d {name}")


def test_a_gated_mlp_is_no_top1_combine():
    """sigmoid(x @ g) [T, 1] times an MLP looks like a top-1 block's `w * y`, but the [T, 1] factor is
    no top-1 choice: nothing is examined (no moe anchor, no decline)."""
    x = jnp.ones((8, 16))
    g, w1, w2 = jnp.ones((16, 1)), jnp.ones((16, 32)) * 0.1, jnp.ones((32, 16)) * 0.1

    def fn(x, g, w1, w2):
        return jax.nn.sigmoid(x @ g) * (jax.nn.relu(x @ w1) @ w2)

    plan = moefuse.plan(fn, x, g, w1, w2)
    assert plan.fused == [] and plan.declined == [], str(plan)
