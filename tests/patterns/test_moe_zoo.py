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
    "scan_layers_sorted": "sorted",
    "loop_masks_mixtral": "loop",
    "checkpoint_two_layers_relu_bias": "dense",
    "vmap_experts_dict_gelu_bias": "dense",
    "gather_take_gelu_bf16_top1": "gather",
    "nnx_moe_module": "gather",
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
    assert sum(s.op == "route" for s in plan.fused) == case.count, str(plan)  # the block's router too
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


GRAD_CASES = [m for m in ALL_MOE_BLOCKS if m.__name__.removeprefix("make_") in FUSED]


@pytest.mark.parametrize("make", GRAD_CASES, ids=lambda m: m.__name__.removeprefix("make_"))
def test_grad_through_fused_blocks_equals_the_original(make):
    """Training through the pass: gradients w.r.t. every floating input match the original's."""
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
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
