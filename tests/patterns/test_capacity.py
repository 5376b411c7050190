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


@pytest.mark.slow  # ~40 s on 2 cores; capacity blocks also fuse and verify in test_moe_zoo.py
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


@pytest.mark.slow  # ~20 s on 2 cores; capacity blocks also fuse and verify in test_moe_zoo.py
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


@pytest.mark.slow  # ~15 s on 2 cores; capacity blocks also fuse and verify in test_moe_zoo.py
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
        (make_nm_moe_capacity_global_count, "positions would be counted over several groups at once"),
        (make_nm_moe_capacity_mixed_order, "cumsum of something other than the one-hot expert mask"),
        (make_nm_moe_capacity_swapped_weights, "not the router's weights of the same choice"),
        (make_nm_moe_capacity_one_based_slots, "off by 1"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[len("make_nm_moe_capacity_") :] or None,
)
def test_capacity_near_miss_declines_with_reason(make, reason):
    case = make()
    assert reason in _moe_decline(case.fn, case.args)


def _gshard_argmax(variant="ok", skew=0.0):
    """GShard top-2 via two argmaxes; positions are recovered as `sum(position * keep, E)` (so 0 where
    dropped) and turned into slots by `one_hot(pos, C)` masked by the keep bit (blind zoo spelling)."""
    G, S, M, H, E, C = 2, 16, 32, 64, 4, 6
    x = normal(3200, (G, S, M))
    wg = normal(3201, (M, E), scale=M**-0.5)
    wg = wg.at[:, :2].add(skew * jnp.sign(x.mean((0, 1)))[:, None])  # skew: experts 0, 1 overflow
    wi = normal(3202, (E, M, H), scale=M**-0.5)
    wo = normal(3203, (E, H, M), scale=H**-0.5)

    def fn(x, wg, wi, wo):
        raw = jax.nn.softmax(jnp.einsum("gsm,me->gse", x, wg), axis=-1)
        mask_1 = onehot_1 = jax.nn.one_hot(jnp.argmax(raw, axis=-1), E)
        gate_1 = jnp.sum(raw * mask_1, axis=-1)
        rest = raw * (1.0 - mask_1)
        mask_2 = jax.nn.one_hot(jnp.argmax(rest, axis=-1), E)
        gate_2 = jnp.sum(rest * mask_2, axis=-1)
        pos_in_1 = jnp.cumsum(mask_1, axis=1) - mask_1
        mask_1 = mask_1 * (pos_in_1 < C)
        local_2 = jnp.cumsum(mask_2, axis=1) - mask_2
        pos_in_2 = local_2 + jnp.sum(mask_1, axis=1, keepdims=True)
        mask_2 = mask_2 * (pos_in_2 < C)
        if variant == "second_without_counts":  # keep bit right, slot from the per-choice position
            pos_in_2 = local_2
        pos_1 = jnp.sum(pos_in_1 * mask_1, axis=-1).astype(jnp.int32)
        pos_2 = jnp.sum(pos_in_2 * mask_2, axis=-1).astype(jnp.int32)
        gate_1 = gate_1 * jnp.sum(mask_1, axis=-1)
        gate_2 = gate_2 * jnp.sum(mask_2, axis=-1)
        expert_1 = mask_1 if variant != "unmasked_slots" else onehot_1  # not masked by the keep bit
        dispatch_1 = jax.nn.one_hot(pos_1, C)[:, :, None, :] * expert_1[..., None]
        dispatch_2 = mask_2[..., None] * jax.nn.one_hot(pos_2, C)[:, :, None, :]
        combine = gate_1[..., None, None] * dispatch_1 + gate_2[..., None, None] * dispatch_2
        xe = jnp.einsum("gsec,gsm->egcm", dispatch_1 + dispatch_2, x)
        h = jax.nn.relu(jnp.einsum("egcm,emh->egch", xe, wi))
        return jnp.einsum("gsec,egcm->gsm", combine, jnp.einsum("egch,ehm->egcm", h, wo))

    return fn, (x, wg, wi, wo)


@pytest.mark.slow  # ~20 s on 2 cores; capacity blocks also fuse and verify in test_moe_zoo.py
def test_gshard_position_times_keep_bit_fuses_with_exact_drops():
    fn, args = _gshard_argmax(skew=10.0)
    (site,) = _moe_sites(moefuse.plan(fn, *args))
    assert (site.params["k"], site.params["capacity"], site.params["capacity_order"]) == (2, 6, "slot_major")
    assert site.params["capacity_groups"] == 2
    want = np.asarray(jax.jit(fn)(*args))
    got = np.asarray(jax.jit(moefuse.fuse(fn))(*args))
    assert np.all(want == 0, axis=-1).sum() >= 2, "the skewed router should overflow the buffers"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        # dropped first choices keep position 0 and are scattered into slot 0 of their expert
        ("unmasked_slots", "sends dropped assignments to slot 0"),
        # second choices' slots counted without the first choices' kept counts (collide with them)
        ("second_without_counts", "without the earlier choices' counts"),
    ],
)
def test_gshard_position_times_keep_bit_near_misses_decline(variant, reason):
    fn, args = _gshard_argmax(variant)
    assert reason in _moe_decline(fn, args)
