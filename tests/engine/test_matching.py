"""The safety checks of the matching machinery, seen through the Plan, and the public API around it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (16, 32))
W = jax.random.normal(jax.random.PRNGKey(1), (32, 8)) * 0.2


def mixtral(x, w):
    probs = jax.nn.softmax(x @ w, axis=-1)
    v, i = lax.top_k(probs, 2)
    return v / v.sum(-1, keepdims=True), i


def test_plan_lists_the_site_with_location_source_and_params():
    plan = moefuse.plan(mixtral, X, W)
    (site,) = plan.fused
    assert site.op == "route" and site.kernel == "xla"
    assert site.location.endswith(f"test_matching.py:{mixtral.__code__.co_firstlineno + 2}")
    assert "lax.top_k(probs, 2)" in site.source
    assert site.params["k"] == 2 and site.params["num_experts"] == 8 and site.params["score"] == "softmax"
    text = str(plan)
    assert "FUSED" in text and "route" in text and site.location in text
    data = json.loads(json.dumps(plan.to_json()))
    assert data["fused"][0]["params"]["post"] == [["renorm", 0.0]]


def test_plan_accepts_shape_dtype_structs():
    plan = moefuse.plan(
        mixtral, jax.ShapeDtypeStruct((16, 32), jnp.float32), jax.ShapeDtypeStruct((32, 8), jnp.float32)
    )
    assert len(plan.fused) == 1


def test_escape_blocks_the_rewrite_and_says_which_value():
    def leaky(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        v, i = lax.top_k(probs, 2)
        logv = jnp.log(v)  # top-k values used outside the router
        return v / v.sum(-1, keepdims=True), i, logv

    plan = moefuse.plan(leaky, X, W)
    assert plan.fused == []
    assert "also used" in plan.declined[0].reason


def test_router_probabilities_used_for_an_aux_loss_are_exposed_not_declined():
    def with_aux(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        v, i = lax.top_k(probs, 2)
        aux = jnp.mean(probs, axis=0).sum()
        return v / v.sum(-1, keepdims=True), i, aux

    plan = moefuse.plan(with_aux, X, W)
    assert plan.fused and plan.fused[0].params["expose_scores"] is True
    out = moefuse.jit(with_aux, verify=True)(X, W)
    np.testing.assert_array_equal(out[1], jax.jit(with_aux)(X, W)[1])


def test_foreign_input_inside_the_region_declines():
    def masked(x, w, valid):
        probs = jax.nn.softmax(x @ w, axis=-1)
        probs = jnp.where(valid[None, :], probs, 0.0)  # another input decides selection
        v, i = lax.top_k(probs, 2)
        return v, i

    plan = moefuse.plan(masked, X, W, jnp.ones((8,), bool))
    assert plan.fused == []
    assert plan.declined


def test_effects_inside_the_region_decline():
    def noisy(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        jax.debug.print("{}", probs[0, 0])
        v, i = lax.top_k(probs, 2)
        return v / v.sum(-1, keepdims=True), i

    # the print reads probs but is outside the region: probs escapes to an effectful consumer,
    # so it must be exposed (and the print must still happen with the same value)
    plan = moefuse.plan(noisy, X, W)
    assert len(plan.fused) == 1 and plan.fused[0].params["expose_scores"]


def test_verify_raises_when_the_fused_op_is_wrong(monkeypatch):
    import moefuse.kernels.route as route_mod

    real = route_mod.route

    def broken(logits, params, **kw):
        w, ids, *rest = real(logits, params, **kw)
        return (w, ids[..., ::-1], *rest)

    monkeypatch.setattr(route_mod, "route", broken)
    with pytest.raises(moefuse.VerificationError, match="elements differ"):
        moefuse.jit(mixtral, verify=True)(X, W)


def test_fuse_composes_with_grad_vmap_and_jit():
    def loss(w, x):
        wts, ids = mixtral(x, w)
        return jnp.sum(wts * ids.astype(jnp.float32))

    g_ref = jax.jit(jax.grad(loss))(W, X)
    g = jax.jit(jax.grad(moefuse.fuse(loss)))(W, X)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    xs = jnp.stack([X, X * 2])
    ref = jax.vmap(mixtral, in_axes=(0, None))(xs, W)
    got = jax.jit(jax.vmap(moefuse.fuse(mixtral), in_axes=(0, None)))(xs, W)
    np.testing.assert_array_equal(got[1], ref[1])


def test_disable_env_turns_the_pass_off(monkeypatch):
    monkeypatch.setenv("MOEFUSE_DISABLE", "1")
    jaxpr = jax.make_jaxpr(moefuse.fuse(mixtral))(X, W)
    assert "custom_vjp_call" not in str(jaxpr)
    monkeypatch.delenv("MOEFUSE_DISABLE")
    assert "custom_vjp_call" in str(jax.make_jaxpr(moefuse.fuse(mixtral))(X, W))


def test_debug_log_reports_decisions(caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="moefuse"):
        moefuse.plan(mixtral, X, W)
    assert any("fused route" in r.getMessage() for r in caplog.records)


def test_kernel_selection_table_has_rows_for_every_platform():
    from moefuse import select

    logits = jax.ShapeDtypeStruct((16, 8), jnp.float32)
    req = select.Request("route", {"num_experts": 8, "k": 2}, (logits,))
    assert select.choose(req, select.target_for("cpu")).kernel.impl == "xla"
    assert {r.impl for r in select.rows("route")} >= {"pallas_tpu", "pallas_gpu", "xla"}
    assert {r.platform for r in select.rows("moe")} == {"tpu", "gpu", "cpu"}
    nothing = select.choose(select.Request("nonexistent", {}, (logits,)), select.target_for("cpu"))
    assert nothing.kernel is None and "no kernel for 'nonexistent'" in nothing.reason


def test_a_crashing_pattern_declines_instead_of_breaking_the_program(monkeypatch):
    from moefuse.patterns.router import ROUTER

    def boom(view, anchor):
        raise RuntimeError("bug")

    monkeypatch.setattr(ROUTER, "match", boom)
    plan = moefuse.plan(mixtral, X, W)
    assert plan.fused == [] and "internal error" in plan.declined[0].reason
    np.testing.assert_array_equal(moefuse.jit(mixtral)(X, W)[1], jax.jit(mixtral)(X, W)[1])


def test_plan_shows_the_flax_module_path():
    import flax.linen as nn

    class Router(nn.Module):
        @nn.compact
        def __call__(self, x):
            p = jax.nn.softmax(nn.Dense(8, use_bias=False, name="gate")(x), -1)
            v, i = lax.top_k(p, 2)
            return v / v.sum(-1, keepdims=True), i

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Router(name="router")(x)

    params = Block().init(KEY, X)
    (site,) = moefuse.plan(Block().apply, params, X).fused
    assert site.scope == "Block/router"
    assert "[Block/router]" in str(moefuse.plan(Block().apply, params, X))


def test_a_pattern_whose_scan_crashes_fuses_nothing_and_breaks_nothing(monkeypatch, caplog):
    from moefuse.patterns.router import ROUTER

    def boom(view):
        raise RuntimeError("bug")

    monkeypatch.setattr(ROUTER, "anchors", boom)
    assert moefuse.plan(mixtral, X, W).fused == []
    assert any("router" in r.getMessage() or "route" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(moefuse.jit(mixtral)(X, W)[1], jax.jit(mixtral)(X, W)[1])
