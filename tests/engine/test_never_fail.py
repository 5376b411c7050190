"""Never fail where `jax.jit` works: internal errors decline their site, bodies trace in their context.

Each test injects a failure into one stage of the pass (a pattern's match, its anchor scan, the
fused op's emit, a body's analysis) or builds a program whose bodies need their own tracing
context (`shard_map` with `axis_index` and collectives), and checks that the program still runs
with the original's results and that the Plan says what happened. `MOEFUSE_STRICT=1` raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import moefuse
from moefuse import rewrite
from moefuse.patterns import router

X = jax.random.normal(jax.random.PRNGKey(0), (16, 32))
W = jax.random.normal(jax.random.PRNGKey(1), (32, 8)) * 0.2


def mixtral_router(x, w):
    probs = jax.nn.softmax(x @ w, axis=-1)
    v, i = lax.top_k(probs, 2)
    return v / v.sum(-1, keepdims=True), i


@pytest.fixture(autouse=True)
def _not_strict(monkeypatch):
    monkeypatch.delenv("MOEFUSE_STRICT", raising=False)


def _same(got, want):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)


def _boom(*_args, **_kwargs):
    raise RuntimeError("injected failure\nsecond line")


def test_an_error_in_a_pattern_declines_its_site_and_the_program_runs(monkeypatch):
    monkeypatch.setattr(router.ROUTER, "match", _boom)
    plan = moefuse.plan(mixtral_router, X, W)
    assert plan.fused == []
    (d,) = [d for d in plan.declined if d.op == "route"]
    assert "internal error" in d.reason and "RuntimeError: injected failure" in d.reason
    assert "second line" not in d.reason  # one line
    _same(moefuse.jit(mixtral_router)(X, W), jax.jit(mixtral_router)(X, W))


def test_an_error_after_matching_declines_the_site(monkeypatch):
    monkeypatch.setattr(rewrite, "region_of", _boom)
    plan = moefuse.plan(mixtral_router, X, W)
    assert plan.fused == [] and "injected failure" in plan.declined[0].reason
    _same(moefuse.jit(mixtral_router)(X, W), jax.jit(mixtral_router)(X, W))


def test_an_error_scanning_for_anchors_is_in_the_plan(monkeypatch):
    monkeypatch.setattr(router.ROUTER, "anchors", _boom)
    plan = moefuse.plan(mixtral_router, X, W)
    assert any(d.op == "route" and "scanning" in d.reason for d in plan.declined)
    _same(moefuse.jit(mixtral_router)(X, W), jax.jit(mixtral_router)(X, W))


def test_an_error_analysing_the_program_leaves_it_as_written(monkeypatch):
    monkeypatch.setattr(rewrite, "View", _boom)
    plan = moefuse.plan(mixtral_router, X, W)
    assert plan.fused == [] and "left as written" in plan.declined[0].reason
    _same(moefuse.jit(mixtral_router)(X, W), jax.jit(mixtral_router)(X, W))


def test_an_emit_failure_at_trace_time_runs_the_original_equations(monkeypatch):
    level_of = rewrite.analyse

    def analyse_then_break_emit(*a, **kw):
        level = level_of(*a, **kw)
        for m in level.matches:
            m.proposal.emit = _boom
        return level

    monkeypatch.setattr(moefuse.api, "analyse", analyse_then_break_emit)
    _same(moefuse.jit(mixtral_router)(X, W), jax.jit(mixtral_router)(X, W))


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setattr(router.ROUTER, "match", _boom)
    monkeypatch.setenv("MOEFUSE_STRICT", "1")
    with pytest.raises(RuntimeError, match="injected failure"):
        moefuse.plan(mixtral_router, X, W)


# ---- shard_map bodies trace under their mesh axes ---------------------------------------------


def _mesh(n: int = 2):
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("ep",))


def _moe_block(x, w_router, w_gate, w_up, w_down):
    probs = jax.nn.softmax(x @ w_router, axis=-1)
    weights, ids = lax.top_k(probs, 2)
    weights = weights / weights.sum(-1, keepdims=True)
    combine = (jax.nn.one_hot(ids, probs.shape[-1]) * weights[..., None]).sum(1)
    gate = jnp.einsum("th,ehi->tei", x, w_gate)
    h = jax.nn.silu(gate) * jnp.einsum("th,ehi->tei", x, w_up)
    return jnp.einsum("tei,eih,te->th", h, w_down, combine)


def _moe_args(t=16, d=32, f=64, e=8):
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    return (
        jax.random.normal(ks[0], (t, d)),
        jax.random.normal(ks[1], (d, e)) * 0.3,
        jax.random.normal(ks[2], (e, d, f)) * d**-0.5,
        jax.random.normal(ks[3], (e, d, f)) * d**-0.5,
        jax.random.normal(ks[4], (e, f, d)) * f**-0.5,
    )


def test_shard_map_body_with_axis_index_collectives_and_a_nested_jit_fuses_and_runs():
    mesh = _mesh()

    @jax.jit
    def helper(x):
        return x * 1.0

    def body(x, w_router, w_gate, w_up, w_down):
        shard = lax.axis_index("ep")  # needs the mesh axes when the body is re-traced
        y = _moe_block(helper(x), w_router, w_gate, w_up, w_down)
        y = y + 0.0 * shard.astype(y.dtype)
        total = lax.psum(y, "ep")
        gathered = lax.all_gather(y, "ep", tiled=True)
        return total, gathered

    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(P("ep"), P(), P(), P(), P()), out_specs=(P(), P()), check_vma=False
    )
    args = _moe_args()
    plan = moefuse.plan(fn, *args)
    assert sorted(s.op for s in plan.fused) == ["moe", "route"], str(plan)
    assert all("shard_map" in s.path for s in plan.fused)
    _same(moefuse.jit(fn)(*args), jax.jit(fn)(*args))


def test_shard_map_inside_a_user_mesh_context():
    mesh = _mesh()
    fn = functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("ep"), P(), P(), P(), P()), out_specs=P("ep")
    )(lambda *a: _moe_block(*a) * (1 + lax.axis_index("ep")))
    args = _moe_args()
    with jax.set_mesh(mesh):
        got = moefuse.jit(fn)(*args)
        want = jax.jit(fn)(*args)
        plan = moefuse.plan(fn, *args)
    assert sorted(s.op for s in plan.fused) == ["moe", "route"], str(plan)
    _same(got, want)
