"""The capacity (token-dropping) `moe` pattern: exact drop semantics under overflow, and its declines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse
from tests.zoo import normal
from tests.zoo.moe_near_misses import (
    _gshard_like,
    make_nm_moe_capacity_global_count,
    make_nm_moe_capacity_mixed_order,
    make_nm_moe_capacity_one_based_slots,
    make_nm_moe_capacity_swapped_weights,
)


def _moe_sites(plan):
    return [s for s in plan.fused if s.op == "moe"]


def _skewed_gshard():
    """GShard-style top-2 over [2, 16] tokens whose router sends most tokens to experts 0 and 1."""
    fn, (x, wg, wi, wo) = _gshard_like(3000, None)
    bias = np.zeros(wg.shape, np.float32)
    bias[:, :2] = 3.0 * np.sign(np.asarray(x).mean((0, 1)))[:, None]  # logits of experts 0, 1 dominate
    return fn, (x, wg + jnp.asarray(bias), wi, wo)


def test_overflow_drops_the_same_assignments_as_the_program():
    fn, args = _skewed_gshard()
    plan = moefuse.plan(fn, *args)
    (site,) = _moe_sites(plan)
    assert site.params["dispatch"] == "capacity"
    assert (site.params["capacity"], site.params["capacity_order"], site.params["capacity_groups"]) == (
        4,
        "slot_major",
        2,
    )
    want = np.asarray(jax.jit(fn)(*args))
    got = np.asarray(jax.jit(moefuse.fuse(fn))(*args))
    fully_dropped = np.all(want == 0, axis=-1)
    assert fully_dropped.sum() >= 4, "the skewed router should overflow the buffers"
    np.testing.assert_array_equal(got[fully_dropped], 0.0)  # dropped exactly, not approximately
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    moefuse.jit(fn, verify=True)(*args)


def test_kernel_drop_rule_is_what_decides():
    """Changing the capacity order of the fused op would change the output here (so the test can fail)."""
    fn, args = _skewed_gshard()
    (site,) = _moe_sites(moefuse.plan(fn, *args))
    from moefuse.kernels.moe import MoeParams, moe_ffn_reference

    x, wg, wi, wo = args
    probs = jax.nn.softmax(jnp.einsum("gsm,me->gse", x, wg), axis=-1)
    gates, idx = lax.top_k(probs, 2)
    gates = gates / gates.sum(-1, keepdims=True)
    outs = {}
    for order in ("slot_major", "token_major"):
        p = MoeParams(
            num_experts=8, k=2, activation="relu", capacity=4, capacity_order=order, capacity_groups=2
        )
        outs[order] = np.asarray(
            moe_ffn_reference(x.reshape(-1, 32), gates.reshape(-1, 2), idx.reshape(-1, 2), wi, wo, p)
        )
    want = np.asarray(jax.jit(fn)(*args)).reshape(-1, 32)
    np.testing.assert_allclose(outs[site.params["capacity_order"]], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(outs["token_major"], want, rtol=1e-5, atol=1e-6)


def _switch(compare):
    num_tokens, d_model, d_ff, num_experts, capacity = 64, 32, 64, 16, 4
    x = normal(3100, (num_tokens, d_model))
    wr = normal(3101, (d_model, num_experts), scale=2.0 * d_model**-0.5)
    wi = normal(3102, (num_experts, d_model, d_ff), scale=d_model**-0.5)
    wo = normal(3103, (num_experts, d_ff, d_model), scale=d_ff**-0.5)

    def fn(x, wr, wi, wo):
        gate, idx = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), 1)
        mask = jax.nn.one_hot(idx[:, 0], num_experts, dtype=jnp.int32)
        prio = jnp.cumsum(mask, axis=0) * mask - 1
        mask = mask * compare(prio, capacity)
        dispatch = jax.nn.one_hot(prio, capacity, dtype=jnp.int32) * mask[..., None]
        combine = dispatch.astype(jnp.float32) * gate[:, 0, None, None]
        xe = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)
        y = jnp.einsum("ecf,efd->ecd", jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, wi)), wo)
        return jnp.einsum("tec,ecd->td", combine, y)

    return fn, (x, wr, wi, wo)


def test_switch_top1_fuses_with_exact_drops():
    fn, args = _switch(lambda p, c: p < c)
    (site,) = _moe_sites(moefuse.plan(fn, *args))
    assert (site.params["k"], site.params["capacity"], site.params["activation"]) == (1, 4, "silu")
    want = np.asarray(jax.jit(fn)(*args))
    got = np.asarray(jax.jit(moefuse.fuse(fn))(*args))
    dropped = np.all(want == 0, axis=-1)
    assert dropped.any()
    np.testing.assert_array_equal(got[dropped], 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _moe_decline(fn, args):
    plan = moefuse.plan(fn, *args)
    assert _moe_sites(plan) == [], str(plan)
    reasons = [d.reason for d in plan.declined if d.op == "moe" and "capacity" in d.reason]
    assert reasons, str(plan)
    return reasons[0]


def test_keep_rule_off_by_one_declines():
    fn, args = _switch(lambda p, c: p <= c)  # keeps C + 1 per expert into C slots
    assert "off-by-one" in _moe_decline(fn, args)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (make_nm_moe_capacity_global_count, "not a count of assignments per expert"),
        (make_nm_moe_capacity_mixed_order, "cumsum of something other than the one-hot expert mask"),
        (make_nm_moe_capacity_swapped_weights, "not the router's weights of the same choice"),
        (make_nm_moe_capacity_one_based_slots, "off by 1"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[len("make_nm_moe_capacity_") :] or None,
)
def test_capacity_near_miss_declines_with_reason(make, reason):
    case = make()
    assert reason in _moe_decline(case.fn, case.args)
