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
    "vmap_experts_swiglu": "dense",
    "shared_ling26_block": "dense",
    "gather_decode_einsum": "gather",
    "sorted_maxtext_ragged_dot": "sorted",
    "shared_deepseek_v3_sorted": "sorted",
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
    for site in sites:
        assert site.params["dispatch"] == FUSED[case.name]
        assert site.params["num_experts"] == case.expect["num_experts"]
        assert site.params["k"] == case.expect["k"]
        assert site.params["activation"] == case.expect["activation"]
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
