"""The third, fourth and fifth blind-written MoE zoos (tests/zoo/moe_blocks_blind3.py, moe_blocks_blind4.py,
moe_blocks_blind5.py, written from descriptions of MoE layers without seeing the patterns) against the
`moe` pattern.

Blocks that fuse must fuse whole, with the parameters they were written with, and give the original's
results (`verify=True`) and gradients. Blocks that do not fuse yet are listed with the reason the Plan
shows, and must run unchanged.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moefuse
from tests.patterns.test_moe_blind2 import assert_moe_site
from tests.zoo.moe_blocks_blind3 import BLIND3_MOE_BLOCKS
from tests.zoo.moe_blocks_blind4 import BLIND4_MOE_BLOCKS
from tests.zoo.moe_blocks_blind5 import BLIND5_MOE_BLOCKS

# slow tier: 1-3 s per block for the plan and verify run, a few more for the gradients; the zoos'
# self-checks (tests/zoo) run by default
pytestmark = pytest.mark.slow

BLOCKS = BLIND3_MOE_BLOCKS + BLIND4_MOE_BLOCKS + BLIND5_MOE_BLOCKS

# case name -> the dispatch the Plan reports
FUSED = {
    # blind3
    "eqx_vmap_experts_manual_sigmoid": "dense",
    "haiku_mixtral_logsumexp_loop": "loop",
    "qwen2_moe_loop_shared_gate": "loop",
    "olmoe_argsort_topk_dense": "dense",
    "dbrx_scores_twice_gather": "gather",
    "research_repeat_perm_ragged": "sorted",
    "praxis_x_none_matmul_gelu_bias": "dense",
    "flaxformer_hand_gelu_letters": "dense",
    "levanter_take_along_axis_combine": "dense",
    "linen_vmap_batch_loop_experts": "loop",
    "deepseek_v3_groups_gather_shared": "gather",
    "ling_groups_bf16_loop": "loop",
    "switch_t5x_top1_capacity": "capacity",
    "jetmoe_topk_softmax_gather_fused": "gather",
    "grok_take_gather_geglu_bf16": "gather",
    "arctic_residual_sorted_scatter": "sorted",
    "jamba_bf16_loop_f32_router": "loop",
    "deepseek_v2_scale_scatter_dense": "dense",
    "keras_sorted_inverse_scatter_silu": "sorted",
    "research_slot_loop_torch_gather": "gather",
    "praxis_grouped_tokens_geglu": "dense",
    "sigmoid_bias_twice_vmap_experts": "dense",
    # blind4
    "eqx_expert_modules_torch_linear_where": "loop",
    "linen_dense_per_expert_onehot_column": "loop",
    "haiku_slotwise_where_sum_top3": "loop",
    "nnx_token_mask_loop_shared": "loop",
    "llama4_loop_top2_on_input_bf16": "loop",
    "llama4_sorted_ragged_on_input": "sorted",  # ids flattened by ids[:, 0], not ids.reshape(-1)
    "argsort_reversed_fancy_vmap_tokens": "gather",
    "phimoe_sparsemixer_loop": "loop",
    "torch_dense_scatter_gates_letters": "dense",
    "argmax_twice_neg_inf_geglu": "dense",
    "sigmoid_gelu_gather_tkd_shared": "gather",
    "keras_argmax_max_top1_dense_bias": "dense",
    # blind5
    "remat_argsort_desc_pick_outputs": "dense",
    "vmap_batch_sigmoid_gather_tk_tkd": "gather",
    "deepseek_sigmoid_bias_group_max_dense": "dense",
    # (token, slot) pairs flattened: x[rows] with W[ids.reshape(-1)], summed back by segment_sum or
    # zeros.at[rows].add (rows = i // k)
    "haiku_linear_bias_segment_sum": "gather",
    "qwen2_bf16_pairs_at_add_shared_gate": "gather",
    # weights laid out as a [T, E] matrix 0 off the chosen experts: where(mask, p, 0) renormalised over
    # E, and softmax(where(mask, logits, -inf)) over E
    "onehot_mask_where_gates_bsd_geglu": "dense",
    "masked_softmax_over_chosen_dense_silu": "dense",
    # top-1 dispatch einsum('ce,cd->ecd', one_hot, x) inside a scan, combined by one_hot * w
    "scan_token_chunks_top1_relu_bias": "masked",
}

# Fused blocks whose router stays as written, and the reason the Plan shows (None: no route decline).
ROUTER_NOT_FUSED = {
    # ids = argsort(p)[:, ::-1][:, :3]: a reversed argsort, nothing declined as a route
    "argsort_reversed_fancy_vmap_tokens": None,
    # SparseMixer's top-2 is two argmaxes with relative-threshold masked softmaxes: no top_k at all
    "phimoe_sparsemixer_loop": None,
    # no top_k: argmax, then argmax again with the first masked to -inf (the combine is one per choice)
    "argmax_twice_neg_inf_geglu": None,
    # no top_k: argmax for the id, max of the probabilities for the weight
    "keras_argmax_max_top1_dense_bias": None,
    # argsort(logits, descending=True)[:, :2]: a sort orders -0.0 / +0.0 and NaNs unlike top_k
    "remat_argsort_desc_pick_outputs": "ids are the same only for softmax scores",
}

# Blocks that do not fuse as `moe`, and a reason the Plan shows for one of its declines (None: nothing
# declined as `moe`).
NOT_FUSED = {
    # Llama4 as HF writes it densely: scores = sigmoid(scatter(-inf at ids of the top-1 logit)), then
    # tile(x, E) * scores through every expert; neither the router nor the block is read
    "llama4_dense_scatter_sigmoid_on_input": None,
    # bf16 top-1 with f32-accumulated gathered projections and y.astype(bf16).astype(f32) before * w:
    # the round trip of the expert output hides the top-1 combine (its gathered einsums are examined)
    "bf16_top1_no_renorm_roundtrip": "no combine of expert outputs by router weights",
    # blind5 (written 2026-12-08)
    # Equinox per-token modules under vmap(experts) of vmap(tokens) on where(routed, x, 0)
    "eqx_stacked_modules_masked_input_geglu": "no combine of expert outputs by router weights",
}


def _case_id(make):
    return make.__name__.removeprefix("make_")


def test_every_blind_case_is_accounted_for():
    names = [_case_id(m) for m in BLOCKS]
    assert len(names) == len(set(names))
    assert set(names) == set(FUSED) | set(NOT_FUSED) and not set(FUSED) & set(NOT_FUSED)
    assert set(ROUTER_NOT_FUSED) <= set(FUSED)


@pytest.mark.parametrize("make", BLOCKS, ids=_case_id)
def test_blind_moe_block(make):
    case = make()
    plan = moefuse.plan(case.fn, *case.args)
    sites = [s for s in plan.fused if s.op == "moe"]
    if case.name in FUSED:
        assert len(sites) == case.count, str(plan)
        for site in sites:
            assert_moe_site(site, FUSED[case.name], case.expect)
            assert site.params.get("weights_on_input", False) == case.expect.get("weights_on_input", False)
        routes = [s for s in plan.fused if s.op == "route"]
        if case.name in ROUTER_NOT_FUSED:
            why = ROUTER_NOT_FUSED[case.name]
            declines = [d.reason for d in plan.declined if d.op == "route"]
            assert not routes and (declines == [] if why is None else any(why in r for r in declines))
        else:
            assert len(routes) == case.count, str(plan)
    else:
        assert sites == [], str(plan)
        reason = NOT_FUSED[case.name]
        moe_declines = [d.reason for d in plan.declined if d.op == "moe"]
        if reason is None:
            assert not moe_declines, str(plan)
        else:
            assert any(reason in d.reason for d in plan.declined), str(plan)
    got = moefuse.jit(case.fn, verify=True)(*case.args)
    want = jax.jit(case.fn)(*case.args)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert np.asarray(g).dtype == np.asarray(w).dtype and np.shape(g) == np.shape(w)


def _is_float(leaf) -> bool:
    return np.asarray(leaf).dtype.kind == "f" or np.asarray(leaf).dtype.name == "bfloat16"


@pytest.mark.parametrize("make", [m for m in BLOCKS if _case_id(m) in FUSED], ids=_case_id)
def test_gradients_through_the_fused_block_are_as_accurate_as_the_originals(make):
    """Gradients w.r.t. every floating input, the fused block's and the original's, are each measured
    against the original's gradient computed with every float input (and so most of the math) in
    float64; the fused one must be within twice the original's own error plus one ulp of the input's
    dtype at the gradient's scale (the two sum over experts and hidden units in different orders)."""
    case = make()
    argnums = tuple(
        i for i, a in enumerate(case.args) if all(_is_float(leaf) for leaf in jax.tree_util.tree_leaves(a))
    )

    def loss(fn):
        def f(*args):
            out = jax.tree_util.tree_leaves(fn(*args))[0]
            return (out.astype(np.float32) * np.cos(np.arange(out.size).reshape(out.shape))).sum()

        return f

    want = jax.jit(jax.grad(loss(case.fn), argnums=argnums))(*case.args)
    got = jax.jit(jax.grad(loss(moefuse.fuse(case.fn)), argnums=argnums))(*case.args)
    assert "custom_vjp_call" in str(jax.make_jaxpr(moefuse.fuse(case.fn))(*case.args))
    wide = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) if _is_float(a) else a, case.args)
    with jax.enable_x64(True):
        exact = jax.jit(jax.grad(loss(case.fn), argnums=argnums))(*wide)
    leaves = zip(*(jax.tree_util.tree_leaves(t) for t in (want, got, exact)), strict=True)
    for i, (w, g, e) in enumerate(leaves):
        eps = jax.numpy.finfo(np.asarray(w).dtype).eps
        w, g, e = (np.asarray(a, np.float64) for a in (w, g, e))
        err_orig, err_fused = np.abs(w - e).max(), np.abs(g - e).max()
        ulp = float(eps) * np.abs(e).max()
        assert err_fused <= 2 * err_orig + ulp, (i, err_fused, err_orig, ulp)
