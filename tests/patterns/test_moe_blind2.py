"""The second blind-written MoE zoo (tests/zoo/moe_blocks_blind2.py, written from a description of MoE
layers without seeing the patterns) against the `moe` pattern.

Blocks that fuse must fuse whole, with the parameters they were written with, and give the original's
results (`verify=True`). Blocks that do not fuse yet are listed with the reason, and must run unchanged.
"""

from __future__ import annotations

import jax
import pytest

import moefuse
from tests.zoo.moe_blocks_blind2 import BLIND2_MOE_BLOCKS

# slow tier: ~40 s per block on 2 cores (a jit, a verify run and gradients of each); the zoo's
# self-checks (tests/zoo) and the first zoo (test_moe_zoo.py) cover the same spellings by default
pytestmark = pytest.mark.slow

# case name -> the dispatch the Plan reports
FUSED = {
    "dense_onehot_combine_bsd": "dense",
    "dense_torch_layout_geglu_bf16": "dense",
    "gather_sigmoid_gelu_bias": "gather",
    "gather_vmap_tokens_eqx_relu": "gather",
    "sorted_maxtext_ragged_bf16": "sorted",
    "vmap_experts_pytree_swiglu": "dense",
    "deepseek_v3_group_limited_shared": "dense",
    "capacity_gshard_top2_relu": "capacity",
    "decode_gather_bf16_gelu": "gather",
    # every expert its own nnx module (weights and biases per expert, taken as they are: PerExpert)
    "loop_nnx_relu_bias": "loop",
}

# Fused blocks whose router stays as written, and why.
ROUTER_NOT_FUSED = {
    # softmax over [E] per token under vmap: its max is taken before the transpose back to [T, E],
    # so the region reads a value the route op does not take
    "gather_vmap_tokens_eqx_relu": "the region also reads",
    # top-2 as argmax, mask, argmax again: see ROUTER_NOT_FUSED in test_moe_zoo.py
    "capacity_gshard_top2_relu": None,
}

# Blocks that do not fuse as `moe`, and the decline reason the Plan shows (None: no anchor at all).
NOT_FUSED = {
    # group sizes from jnp.searchsorted over the sorted ids (a scan): not recognised as a bincount
    "sorted_epmoe_fused_w13": "no combine of expert outputs by router weights",
    # a counting sort by cumsum offsets instead of an argsort
    "sorted_cumsum_segment_sum_geglu": "scatter-add of expert rows not recognised",
}


def _case_id(make):
    return make.__name__.removeprefix("make_")


def test_every_blind_case_is_accounted_for():
    names = {_case_id(m) for m in BLIND2_MOE_BLOCKS}
    assert names == set(FUSED) | set(NOT_FUSED) and not set(FUSED) & set(NOT_FUSED)


def assert_moe_site(site, dispatch: str, expect: dict) -> None:
    """A fused `moe` site has the block's dispatch and its true parameters (`case.expect`)."""
    assert site.params["dispatch"] == dispatch
    assert (site.params["num_experts"], site.params["k"]) == (expect["num_experts"], expect["k"])
    assert site.params["activation"] == expect["activation"]
    assert ("shared_expert" in site.params) == expect["shared_expert"]
    if dispatch == "capacity":
        assert site.params["capacity"] == expect["capacity"]


@pytest.mark.parametrize("make", BLIND2_MOE_BLOCKS, ids=_case_id)
def test_blind_moe_block(make):
    case = make()
    plan = moefuse.plan(case.fn, *case.args)
    sites = [s for s in plan.fused if s.op == "moe"]
    if case.name in FUSED:
        assert len(sites) == case.count, str(plan)
        for site in sites:
            assert_moe_site(site, FUSED[case.name], case.expect)
        routes = [s for s in plan.fused if s.op == "route"]
        if case.name in ROUTER_NOT_FUSED:
            why = ROUTER_NOT_FUSED[case.name]
            assert not routes and (why is None or any(why in d.reason for d in plan.declined))
        else:
            assert len(routes) == case.count, str(plan)
    else:
        assert sites == [], str(plan)
        reason = NOT_FUSED[case.name]
        moe_declines = [d.reason for d in plan.declined if d.op == "moe"]
        assert (reason is None and not moe_declines) or any(reason in r for r in moe_declines), str(plan)
    moefuse.jit(case.fn, verify=True)(*case.args)
    assert jax.tree_util.tree_structure(moefuse.jit(case.fn)(*case.args)) == jax.tree_util.tree_structure(
        jax.jit(case.fn)(*case.args)
    )
