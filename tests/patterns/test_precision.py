"""The fused MoE op rounds where the program rounds (`patterns/precision.py`), or the site is declined.

Each block is written as model code writes mixed precision: matmuls with a `preferred_element_type`,
the hidden rows cast before the down projection, bf16 tokens against f32 weights. A fused site must
be much closer to its original than the original is to the same block computed in one dtype (the
`gap`: so a dropped rounding would fail the test), and a rounding the op cannot reproduce must be
declined with its reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse

T, D, F, E, K = 32, 16, 32, 4, 2
BF16, F32 = jnp.bfloat16, jnp.float32


def _route(x, router_w):
    probs = jax.nn.softmax(x.astype(F32) @ router_w, axis=-1)
    w, ids = lax.top_k(probs, K)
    return w / jnp.sum(w, axis=-1, keepdims=True), ids


def sorted_block(pet=None, hidden=None, act=None, pets=None, out=None):
    """Sorted ragged_dot block; pet: each ragged_dot's preferred_element_type (pets: per projection),
    hidden: the dtype h is cast to before the down projection, act: the dtype the activation runs in,
    out: the result's dtype (default the tokens')."""
    pg, pu, pd = pets or (pet, pet, pet)

    def block(x, router_w, w_gate, w_up, w_down):
        w, ids = _route(x, router_w)
        flat = ids.reshape(-1)
        perm = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=E)
        xs = x[perm // K]
        g = lax.ragged_dot(xs, w_gate, sizes, preferred_element_type=pg)
        u = lax.ragged_dot(xs, w_up, sizes, preferred_element_type=pu)
        h = jax.nn.silu(g.astype(act)) * u.astype(act) if act else jax.nn.silu(g) * u
        h = h.astype(hidden) if hidden else h
        y = lax.ragged_dot(h, w_down, sizes, preferred_element_type=pd).astype(F32)  # for the combine
        y = y[jnp.argsort(perm)].reshape(-1, K, x.shape[-1])
        return jnp.sum(y * w[..., None], axis=1).astype(out or x.dtype)

    return block


def gather_block(pet=None, hidden=None):
    """Per-token `w[ids]` einsums with a preferred_element_type, h cast before the down einsum."""

    def block(x, router_w, w_gate, w_up, w_down):
        w, ids = _route(x, router_w)
        g = jnp.einsum("td,tkdf->tkf", x, w_gate[ids], preferred_element_type=pet)
        u = jnp.einsum("td,tkdf->tkf", x, w_up[ids], preferred_element_type=pet)
        h = jax.nn.silu(g) * u
        h = h.astype(hidden) if hidden else h
        y = jnp.einsum("tkf,tkfd->tkd", h, w_down[ids], preferred_element_type=pet)
        return jnp.einsum("tkd,tk->td", y.astype(F32), w).astype(x.dtype)

    return block


def make_args(x_dtype, w_dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, D)), x_dtype)
    router_w = jnp.asarray(rng.standard_normal((D, E)), F32)
    shapes = ((E, D, F), (E, D, F), (E, F, D))
    w = [jnp.asarray(rng.standard_normal(s) * s[1] ** -0.5, w_dtype) for s in shapes]
    return [x, router_w, *w]


def _moe_sites(fn, args):
    """(fused moe sites, declined moe sites, plan)."""
    plan = moefuse.plan(fn, *args)
    return [s for s in plan.fused if s.op == "moe"], [d for d in plan.declined if d.op == "moe"], plan


def _mean_diff(a, b) -> float:
    """Mean |a - b|: bf16 outputs differ by whole ulps, so a max would count one flipped rounding."""
    return float(jnp.mean(jnp.abs(jnp.asarray(a, F32) - jnp.asarray(b, F32))))


FUSING = {
    # bf16 tokens and weights, f32-accumulated projections, activation in f32, bf16 hidden rows (SGLang-JAX)
    "sorted_f32_accumulate_bf16_hidden": (sorted_block(F32, BF16), (BF16, BF16), sorted_block(),
                                          {"projection_dtype": "float32", "hidden_dtype": "bfloat16"}),
    # the same, its f32 combine returned as it is (not rounded to the tokens' bf16)
    "sorted_f32_accumulate_f32_result": (sorted_block(F32, BF16, out=F32), (BF16, BF16),
                                         sorted_block(out=F32), {"out_dtype": "float32"}),
    # f32 rows and weights, projections rounded to bf16, hidden rows upcast (EasyDeL STANDARD_MOE)
    "sorted_bf16_projections_f32_hidden": (sorted_block(BF16, F32), (F32, F32), sorted_block(),
                                           {"projection_dtype": "bfloat16", "hidden_dtype": "float32"}),
    "gather_f32_accumulate_bf16_hidden": (gather_block(F32, BF16), (BF16, BF16), gather_block(),
                                          {"projection_dtype": "float32", "hidden_dtype": "bfloat16"}),
    # bf16 tokens against f32 weights: jnp promotes, the FFN computes in f32
    "sorted_bf16_tokens_f32_weights": (sorted_block(), (BF16, F32), None, {"compute_dtype": "float32"}),
}


@pytest.mark.parametrize("name", FUSING)
def test_mixed_precision_block_fuses_with_the_programs_rounding(name):
    fn, (x_dtype, w_dtype), one_dtype, want_params = FUSING[name]
    args = make_args(x_dtype, w_dtype)
    sites, declined, plan = _moe_sites(fn, args)
    assert len(sites) == 1 and not declined, str(plan)
    for key, value in want_params.items():
        assert sites[0].params.get(key) == value, (key, str(plan))
    want = jax.jit(fn)(*args)
    got = moefuse.jit(fn)(*args)
    assert got.dtype == want.dtype
    if one_dtype is not None:  # the same block without the program's own roundings
        gap = _mean_diff(jax.jit(one_dtype)(*args), want)
    else:  # the weights rounded to the tokens' dtype (what the op did before it read the promotion)
        gap = _mean_diff(jax.jit(fn)(*args[:2], *(w.astype(x_dtype) for w in args[2:])), want)
    assert gap > 1e-4, gap  # the rounding is visible at this size
    assert _mean_diff(got, want) <= 0.1 * gap, (_mean_diff(got, want), gap)


def test_activation_upcast_between_bf16_projections_is_read():
    """bf16 projections, the activation upcast to f32, bf16 hidden rows: read as such. At the bf16
    output this block, its all-bf16 twin and the fused op differ by about one ulp (XLA keeps bf16
    elementwise chains in f32), so the outputs are compared at bf16 precision only."""
    fn, args = sorted_block(act=F32, hidden=BF16), make_args(BF16, BF16)
    sites, declined, plan = _moe_sites(fn, args)
    assert len(sites) == 1 and not declined, str(plan)
    want_params = {"projection_dtype": "bfloat16", "activation_dtype": "float32", "hidden_dtype": "bfloat16"}
    assert {key: sites[0].params.get(key) for key in want_params} == want_params, str(plan)
    want, got = jax.jit(fn)(*args), moefuse.jit(fn)(*args)
    scale = float(jnp.max(jnp.abs(want.astype(F32))))
    assert _max_diff(got, want) <= float(jnp.finfo(BF16).eps) * scale


def _max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, F32) - jnp.asarray(b, F32))))


DECLINED = {
    # gate and up accumulate in f32, the down projection in bf16
    "projections_in_different_dtypes": (sorted_block(pets=(F32, F32, BF16), hidden=BF16), (BF16, BF16),
                                        "the expert projections compute in several dtypes"),
}


@pytest.mark.parametrize("name", DECLINED)
def test_rounding_the_op_cannot_reproduce_is_declined_with_its_reason(name):
    fn, (x_dtype, w_dtype), reason = DECLINED[name]
    args = make_args(x_dtype, w_dtype)
    sites, declined, plan = _moe_sites(fn, args)
    assert not sites and len(declined) == 1, str(plan)
    assert reason in declined[0].reason, str(plan)
    np.testing.assert_array_equal(np.asarray(moefuse.jit(fn)(*args), np.float32),
                                  np.asarray(jax.jit(fn)(*args), np.float32))
