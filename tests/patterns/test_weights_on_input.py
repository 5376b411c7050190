"""Llama4's MoE: the router's weight scales each token before its expert, the k outputs are summed
with weight 1 (`moe` with weights_on_input), and its router: top-k of the logits, their sigmoid,
laid out as a dense [T, E] matrix by a mask (`route` order="topk_then_score", score="sigmoid").

Each block is a whole program: the Plan must show it fused as written (else the comparison would
be the original against itself), then `moefuse.jit` must give `jax.jit`'s values (expert ids and
the router's dense matrix exactly) and gradients. Each rule read here has a test that fails when
the rule is switched off: a spelling that must fuse, or a near one that must not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse

T, D, F, E = 32, 16, 32, 8


def _params(seed: int = 0, dtype=jnp.float32) -> dict:
    keys = jax.random.split(jax.random.key(seed), 5)
    return {
        "router": jax.random.normal(keys[0], (D, E)) * 2 * D**-0.5,
        "w_gate": (jax.random.normal(keys[1], (E, D, F)) * D**-0.5).astype(dtype),
        "w_up": (jax.random.normal(keys[2], (E, D, F)) * D**-0.5).astype(dtype),
        "w_down": (jax.random.normal(keys[3], (E, F, D)) * F**-0.5).astype(dtype),
    }


def _x(seed: int = 1, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (T, D)).astype(dtype)


def _route_sigmoid(x, p, k):
    top, ids = lax.top_k(x.astype(jnp.float32) @ p["router"], k)
    return jax.nn.sigmoid(top), ids


def _sorted_ffn(rows, p, sizes):
    h = jax.nn.silu(lax.ragged_dot(rows, p["w_gate"], sizes)) * lax.ragged_dot(rows, p["w_up"], sizes)
    return lax.ragged_dot(h, p["w_down"], sizes)


def _sorted_before(k: int, combine: str):
    """Rows scaled before the sort: (repeat(x, k) * w.reshape(-1)[:, None])[order]."""

    def block(x, p):
        w, ids = _route_sigmoid(x, p, k)
        flat = ids.reshape(-1)
        order = jnp.argsort(flat)
        rows = (jnp.repeat(x, k, axis=0) * w.reshape(-1)[:, None])[order]
        y = _sorted_ffn(rows, p, jnp.bincount(flat, length=E))[jnp.argsort(order)].reshape(T, k, D)
        out = y.sum(axis=1) if combine == "sum" else jnp.einsum("tkd,tk->td", y, jnp.ones((T, k)))
        return out, ids

    return block


def _sorted_after(k: int):
    """Rows scaled after the sort: x[order // k] * w.reshape(-1)[order][:, None]."""

    def block(x, p):
        w, ids = _route_sigmoid(x, p, k)
        flat = ids.reshape(-1)
        order = jnp.argsort(flat)
        rows = x[order // k] * w.reshape(-1)[order][:, None]
        y = _sorted_ffn(rows, p, jnp.bincount(flat, length=E))[jnp.argsort(order)]
        return y.reshape(T, k, D).sum(axis=1), ids

    return block


def _top1_unsummed(x, p):
    """k = 1 and x[order] (no // 1): the unsorted rows are the output, nothing summed."""
    w, ids = _route_sigmoid(x, p, 1)
    order = jnp.argsort(ids.reshape(-1))
    rows = (x * w)[order]
    return _sorted_ffn(rows, p, jnp.bincount(ids.reshape(-1), length=E))[jnp.argsort(order)], ids


def _gathered(k: int):
    """Per-token weight gather on the tokens scaled per slot: einsum('tkd,tkdf->tkf', x * w, W[ids])."""

    def block(x, p):
        w, ids = _route_sigmoid(x, p, k)
        xs = x[:, None, :] * w[..., None]  # [T, k, D]
        h = jax.nn.silu(jnp.einsum("tkd,tkdf->tkf", xs, p["w_gate"][ids]))
        h = h * jnp.einsum("tkd,tkdf->tkf", xs, p["w_up"][ids])
        return jnp.einsum("tkf,tkfd->tkd", h, p["w_down"][ids]).sum(axis=1), ids

    return block


BLOCKS = {
    "sorted_before_sum_k2": (_sorted_before(2, "sum"), "sorted"),
    "sorted_before_ones_k3": (_sorted_before(3, "ones"), "sorted"),
    "sorted_after_sum_k2": (_sorted_after(2), "sorted"),
    "top1_unsummed": (_top1_unsummed, "sorted"),
    "gathered_k2": (_gathered(2), "gather"),
}


def _moe_site(plan):
    (site,) = [s for s in plan.fused if s.op == "moe"]
    return site


@pytest.mark.parametrize("name", BLOCKS)
def test_scaled_rows_fuse_as_weights_on_input(name):
    block, dispatch = BLOCKS[name]
    x, p = _x(), _params()
    plan = moefuse.plan(block, x, p)
    site = _moe_site(plan)
    assert site.params["weights_on_input"] and site.params["dispatch"] == dispatch, str(plan)
    assert [s.op for s in plan.fused] == ["route", "moe"], str(plan)  # top-k -> sigmoid is the route
    got, want = moefuse.jit(block)(x, p), jax.jit(block)(x, p)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sorted_before_sum_k2", "sorted_after_sum_k2", "gathered_k2"])
def test_gradients_through_the_scaled_rows(name):
    block, _ = BLOCKS[name]
    x, p = _x(), _params()
    cot = jax.random.normal(jax.random.key(7), (T, D))

    def loss(fn):
        return jax.grad(lambda x, p: jnp.sum(fn(x, p)[0] * cot), argnums=(0, 1))

    got = jax.jit(loss(moefuse.fuse(block)))(x, p)
    want = jax.jit(loss(block))(x, p)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("again", ["mul", "einsum"])
def test_a_top1_block_weighting_its_scaled_rows_again_is_not_fused(again):
    """Scaled rows whose top-1 outputs are weighted by the router again: neither form, not even the
    unsorted rows alone as a block of their own."""

    def block(x, p):
        w, ids = _route_sigmoid(x, p, 1)
        order = jnp.argsort(ids.reshape(-1))
        y = _sorted_ffn((x * w)[order], p, jnp.bincount(ids.reshape(-1), length=E))[jnp.argsort(order)]
        return (y * w if again == "mul" else jnp.einsum("tkd,tk->td", y.reshape(T, 1, D), w)), ids

    plan = moefuse.plan(block, _x(), _params())
    assert [s.op for s in plan.fused] == ["route"], str(plan)


def test_a_norm_factor_on_the_tokens_is_not_a_routing_weight():
    """k = 1 with x[order] and tokens scaled by an RMSNorm factor, outputs weighted by the router:
    the usual form with the normed tokens as x (the factor is not the router's weight)."""

    def block(h, p):
        x = h * lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        w, ids = _route_sigmoid(x, p, 1)
        order = jnp.argsort(ids.reshape(-1))
        y = _sorted_ffn(x[order], p, jnp.bincount(ids.reshape(-1), length=E))[jnp.argsort(order)]
        return jnp.einsum("tkd,tk->td", y.reshape(T, 1, D), w), ids

    x, p = _x(), _params()
    site = _moe_site(moefuse.plan(block, x, p))
    assert not site.params["weights_on_input"]
    np.testing.assert_allclose(moefuse.jit(block)(x, p)[0], jax.jit(block)(x, p)[0], rtol=1e-5, atol=1e-5)


def test_bf16_rows_and_experts_summed_in_f32_as_jnp_sum_does():
    x, p = _x(dtype=jnp.bfloat16), _params(dtype=jnp.bfloat16)

    def block(x, p):
        w, ids = _route_sigmoid(x, p, 2)
        w = w.astype(jnp.bfloat16)
        order = jnp.argsort(ids.reshape(-1))
        rows = (jnp.repeat(x, 2, axis=0) * w.reshape(-1)[:, None])[order]
        y = _sorted_ffn(rows, p, jnp.bincount(ids.reshape(-1), length=E))[jnp.argsort(order)]
        return y.reshape(T, 2, D).sum(axis=1), ids

    site = _moe_site(moefuse.plan(block, x, p))
    assert site.params["weights_on_input"] and site.params["compute_dtype"] is None  # bf16 rows and FFN
    assert site.params["weights_dtype"] == "float32"  # a bf16 jnp.sum accumulates in f32
    got, want = moefuse.jit(block)(x, p)[0], jax.jit(block)(x, p)[0]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2,
                               atol=2e-2)


def test_rows_scaled_in_bf16_then_projected_in_f32():
    """bf16 tokens times bf16 weights (the product rounded to bf16), cast to f32 for f32 experts."""
    x, p = _x(dtype=jnp.bfloat16), _params()

    def block(x, p):
        w, ids = _route_sigmoid(x, p, 2)
        order = jnp.argsort(ids.reshape(-1))
        rows = (jnp.repeat(x, 2, axis=0) * w.astype(jnp.bfloat16).reshape(-1)[:, None])[order]
        y = _sorted_ffn(rows.astype(jnp.float32), p, jnp.bincount(ids.reshape(-1), length=E))
        return y[jnp.argsort(order)].reshape(T, 2, D).sum(axis=1), ids

    site = _moe_site(moefuse.plan(block, x, p))
    assert site.params["compute_dtype"] == "float32" and site.params["weights_dtype"] == "float32"
    got, want = moefuse.jit(block)(x, p)[0], jax.jit(block)(x, p)[0]
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bf16_tokens_scaled_by_f32_weights_then_cast_down_for_bf16_experts():
    """jnp promotes bf16 tokens to f32 to multiply them by f32 weights; the f32 rows are cast down to
    the experts' bf16: the op's own rounding of the rows (x * w in their promoted dtype, then cdt)."""
    x, p = _x(dtype=jnp.bfloat16), _params(dtype=jnp.bfloat16)

    def block(x, p):
        w, ids = _route_sigmoid(x, p, 2)  # f32 weights
        order = jnp.argsort(ids.reshape(-1))
        rows = (jnp.repeat(x, 2, axis=0) * w.reshape(-1)[:, None])[order].astype(jnp.bfloat16)
        y = _sorted_ffn(rows, p, jnp.bincount(ids.reshape(-1), length=E))[jnp.argsort(order)]
        return y.reshape(T, 2, D).sum(axis=1), ids

    site = _moe_site(moefuse.plan(block, x, p))
    assert site.params["weights_on_input"] and site.params["compute_dtype"] is None
    got, want = moefuse.jit(block)(x, p)[0], jax.jit(block)(x, p)[0]
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2,
                               atol=2e-2)


# ---- the router ------------------------------------------------------------------------------------


def _llama4_router(logits):
    """EasyDeL's Llama4 router: top-1 of the logits, the sigmoid of every logit kept at the chosen one."""
    _, ids = lax.top_k(logits, 1)
    mask = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], ids].set(True)
    return jnp.where(mask, jax.nn.sigmoid(logits), 0.0)


def _hard_logits():
    """Logits whose sigmoid underflows to 0, saturates to 1, is NaN; ties."""
    logits = jax.random.normal(jax.random.key(3), (T, E)) * 4
    logits = logits.at[0].set(-200.0).at[1, 2].set(jnp.nan).at[2].set(50.0).at[3, :3].set(jnp.inf)
    return logits.at[4].set(0.0)


def test_the_dense_sigmoid_router_fuses_and_gives_the_matrix_bit_for_bit():
    logits = _hard_logits()
    plan = moefuse.plan(_llama4_router, logits)
    (site,) = plan.fused
    assert site.op == "route" and site.params["score"] == "sigmoid"
    assert site.params["order"] == "topk_then_score"
    assert any("dense" in note for note in site.notes), site.notes
    got, want = np.asarray(moefuse.jit(_llama4_router)(logits)), np.asarray(jax.jit(_llama4_router)(logits))
    assert (want[0] == 0).all() and np.isnan(want).any() and (want == 1).any()
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))  # NaN and the sign of 0 included
    gw = jax.grad(lambda v: jnp.sum(jnp.nan_to_num(_llama4_router(v)) * jnp.arange(E)))
    logits = jax.random.normal(jax.random.key(4), (T, E))
    np.testing.assert_allclose(jax.jit(moefuse.fuse(gw))(logits), jax.jit(gw)(logits), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fill", [-0.0, 1.0])
def test_the_dense_layout_needs_a_plus_zero_fill(fill):
    def router(logits):
        _, ids = lax.top_k(logits, 1)
        mask = jnp.zeros(logits.shape, bool).at[jnp.arange(T)[:, None], ids].set(True)
        return jnp.where(mask, jax.nn.sigmoid(logits), fill)

    assert moefuse.plan(router, _hard_logits()).fused == []


def test_the_mask_must_be_of_the_same_logits_top_k():
    def router(logits, other):
        _, ids = lax.top_k(other, 1)
        mask = jnp.zeros(logits.shape, bool).at[jnp.arange(T)[:, None], ids].set(True)
        return jnp.where(mask, jax.nn.sigmoid(logits), 0.0)

    assert moefuse.plan(router, _hard_logits(), _hard_logits()[::-1]).fused == []


def _sharded_top1(make_scores):
    """The scores made outside a shard_map, the top-1 taken inside on them, EasyDeL-style."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    rep = jax.sharding.PartitionSpec()

    def body(scores):
        w, ids = lax.top_k(scores, 1)
        return w * 2.0, ids

    def model(logits):
        return jax.shard_map(body, mesh=mesh, in_specs=(rep,), out_specs=(rep, rep))(make_scores(logits))

    return model


def test_a_top_k_of_masked_sigmoid_scores_made_outside_the_body_is_a_route():
    model = _sharded_top1(_llama4_router)
    plan = moefuse.plan(model, _hard_logits())
    inner = [s for s in plan.fused if s.path]
    assert len(inner) == 1 and inner[0].params["score"] == "none", str(plan)
    assert any("sigmoid masked to the top-1 of its logits" in n for n in inner[0].notes), inner[0].notes
    got, want = moefuse.jit(model)(_hard_logits()), jax.jit(model)(_hard_logits())
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))  # ids: ties at 0 included
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32))


def test_a_top_k_of_scores_masked_by_another_choice_in_a_body_is_not_a_route():
    def scores(logits):
        _, ids = lax.top_k(-logits, 1)  # the mask is not the top-1 of the sigmoid's logits
        mask = jnp.zeros(logits.shape, bool).at[jnp.arange(T)[:, None], ids].set(True)
        return jnp.where(mask, jax.nn.sigmoid(logits), 0.0)

    plan = moefuse.plan(_sharded_top1(scores), _hard_logits())
    assert [s for s in plan.fused if s.path] == [], str(plan)
