"""The MoE-block spelling zoo (written blind) and its near misses against the `moe` pattern.

Spellings moefuse fuses today must fuse as whole blocks with the parameters they were written
with and give the original's results (`verify=True`); spellings not supported yet must not be
fused as `moe` and must run unchanged. Near misses must never fuse as `moe`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moefuse
from tests.zoo.moe_blocks import ALL_MOE_BLOCKS
from tests.zoo.moe_near_misses import MAY_FUSE, NEAR_MOE_MISSES

# Spellings whose blocks fuse today (by case name), and the dispatch the Plan reports.
FUSED = {
    "dense_tpu_inference_onehot": "dense",
    "dense_maxtext_bsd_bf16_scatter": "dense",
    "vmap_experts_swiglu": "dense",
    "shared_ling26_block": "dense",
    "gather_decode_einsum": "gather",
    "sorted_maxtext_ragged_dot": "sorted",
    "sorted_epmoe_fused_w13_bf16": "sorted",
    "sorted_segment_sum_geglu_bias": "sorted",
    "sorted_oai_interleaved_bias": "sorted",
    "shared_deepseek_v3_sorted": "sorted",
    "scan_layers_sorted": "sorted",
    "sorted_shard_map_repeated_rows": "sorted",
    "loop_masks_mixtral": "loop",
    "loop_qwen2_moe_shared_gate": "loop",
    "loop_per_expert_modules_torch": "loop",
    "loop_per_expert_unrolled_slots": "loop",
    "loop_stacked_unrolled_slots_mul": "loop",
    "checkpoint_two_layers_relu_bias": "dense",
    "vmap_experts_dict_gelu_bias": "dense",
    "gather_take_gelu_bf16_top1": "gather",
    "gather_top1_no_sum": "gather",
    "gather_gpt_oss_reference": "gather",
    "nnx_moe_module": "gather",
    "capacity_gshard_top2": "capacity",
    "capacity_maxtext_token_major": "capacity",
    "capacity_switch_top1_bf16": "capacity",
    "llama4_sorted_top1_sigmoid": "sorted",
    "llama4_dense_scores_matrix": "dense",
}

# Blocks whose router stays as the program wrote it (the `moe` op takes its weights and ids as given).
ROUTER_NOT_FUSED = {
    # top-2 by argmax, then argmax again after multiplying the winner by 0: when every other softmax
    # probability underflows to exactly 0 and the winner is expert 0, argmax picks expert 0 again
    # where lax.top_k picks expert 1, and that second choice takes a capacity slot elsewhere.
    "capacity_gshard_top2",
}

# The fused `moe` op takes whatever (weights, ids) feed the combine, exactly as the program does;
# it does not own the router, so weights and ids from two different routers are still computed
# exactly (verify=True below checks it). A fusion that also absorbed a router would have to decline.
TAKES_WEIGHTS_AND_IDS_AS_GIVEN = {"nm_moe_ids_from_other_router"}


def _moe_sites(plan):
    return [s for s in plan.fused if s.op == "moe"]


@pytest.mark.parametrize("make", ALL_MOE_BLOCKS, ids=lambda m: m.__name__.removeprefix("make_"))
def test_moe_block_spelling(make):
    case = make()
    plan = moefuse.plan(case.fn, *case.args)
    sites = _moe_sites(plan)
    if case.name not in FUSED:
        assert sites == [], str(plan)
        return
    assert len(sites) == case.count, str(plan)
    routers = 0 if case.name in ROUTER_NOT_FUSED else case.count
    assert sum(s.op == "route" for s in plan.fused) == routers, str(plan)  # the block's router too
    for site in sites:
        assert site.params["dispatch"] == FUSED[case.name]
        assert site.params["num_experts"] == case.expect["num_experts"]
        assert site.params["k"] == case.expect["k"]
        assert site.params["activation"] == case.expect["activation"]
        assert ("shared_expert" in site.params) == case.expect["shared_expert"]  # the whole block, one op
        if case.expect["dispatch"] == "capacity":
            assert site.params["capacity"] == case.expect["capacity"]
    got = moefuse.jit(case.fn, verify=True)(*case.args)
    want = jax.jit(case.fn)(*case.args)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert np.asarray(g).dtype == np.asarray(w).dtype and np.shape(g) == np.shape(w)


@pytest.mark.parametrize("make", NEAR_MOE_MISSES, ids=lambda m: m.__name__.removeprefix("make_"))
def test_moe_near_miss_never_fuses_as_moe(make):
    case = make()
    plan = moefuse.plan(case.fn, *case.args)
    if case.name not in MAY_FUSE | TAKES_WEIGHTS_AND_IDS_AS_GIVEN:
        assert _moe_sites(plan) == [], f"{case.note}\n{plan}"
    got = moefuse.jit(case.fn, verify=True)(*case.args)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(jax.jit(case.fn)(*case.args))


GRAD_CASES = [m for m in ALL_MOE_BLOCKS if m.__name__.removeprefix("make_") in FUSED]


# slow tier: ~5-10 s per block on 2 cores; gradients of the four main spellings stay in the default
# run (test_moe_edge_cases.py::test_values_and_grads)
@pytest.mark.slow
@pytest.mark.parametrize("make", GRAD_CASES, ids=lambda m: m.__name__.removeprefix("make_"))
def test_grad_through_fused_blocks_is_as_accurate_as_the_original(make):
    """Training through the pass: gradients w.r.t. every floating input are as accurate as the original's.

    Both are f32 sums over experts and hidden units in different orders, so they differ by rounding;
    each is measured against the original's gradient in float64, and the fused one must be within
    twice the original's own error (plus one f32 ulp at the gradient's scale).
    """
    case = make()
    dtypes = [{np.asarray(leaf).dtype for leaf in jax.tree_util.tree_leaves(a)} for a in case.args]
    floats = [i for i, d in enumerate(dtypes) if d == {np.dtype(np.float32)}]
    if any(dt.kind == "f" or dt.name == "bfloat16" for d in dtypes for dt in d - {np.dtype(np.float32)}):
        pytest.skip("bf16 case: gradients through bf16 math are compared in the f32 cases")

    def loss(fn):
        def f(*args):
            out = jax.tree_util.tree_leaves(fn(*args))[0]
            return (out * np.cos(np.arange(out.size).reshape(out.shape))).sum()

        return f

    argnums = tuple(floats)
    want = jax.jit(jax.grad(loss(case.fn), argnums=argnums))(*case.args)
    got = jax.jit(jax.grad(loss(moefuse.fuse(case.fn)), argnums=argnums))(*case.args)
    assert "custom_vjp_call" in str(jax.make_jaxpr(moefuse.fuse(case.fn))(*case.args))
    wide = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64) if np.asarray(a).dtype == np.float32 else a, case.args
    )
    with jax.enable_x64(True):
        exact = jax.jit(jax.grad(loss(case.fn), argnums=argnums))(*wide)
    leaves = zip(*(jax.tree_util.tree_leaves(t) for t in (want, got, exact)), strict=True)
    for i, (w, g, e) in enumerate(leaves):
        w, g, e = (np.asarray(a, np.float64) for a in (w, g, e))
        err_orig, err_fused = np.abs(w - e).max(), np.abs(g - e).max()
        ulp = np.finfo(np.float32).eps * np.abs(e).max()
        assert err_fused <= 2 * err_orig + ulp, (i, err_fused, err_orig, ulp)
