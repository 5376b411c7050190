"""MoE blocks whose tokens carry unit batch dims (`tests/zoo/moe_blocks_unit_dims.py`), driven by the
MoE zoo's own checks: the zoo self-check (each block against the per-token numpy reference, each
near miss finite under jit) and the fusion checks of `test_moe_zoo.py` (a block fuses whole with
the parameters it was written with and gives `jax.jit`'s results; a near miss never fuses as `moe`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moefuse
from tests.patterns import test_moe_zoo
from tests.zoo import test_moe_zoo_selfcheck
from tests.zoo.moe_blocks_unit_dims import UNIT_DIM_MOE_BLOCKS, UNIT_DIM_NEAR_MISSES


def _name(make) -> str:
    return make.__name__.removeprefix("make_")


@pytest.mark.parametrize("make", UNIT_DIM_MOE_BLOCKS, ids=_name)
def test_the_block_matches_its_reference(make):
    test_moe_zoo_selfcheck.test_moe_case(make)


@pytest.mark.parametrize("make", UNIT_DIM_MOE_BLOCKS, ids=_name)
def test_the_block_fuses_whole(make, monkeypatch):
    monkeypatch.setitem(test_moe_zoo.FUSED, _name(make), make().expect["dispatch"])
    test_moe_zoo.test_moe_block_spelling(make)


@pytest.mark.parametrize("make", UNIT_DIM_MOE_BLOCKS, ids=_name)
def test_the_fused_block_gives_the_same_results_as_jax_jit(make):
    case = make()
    got = jax.tree_util.tree_leaves(moefuse.jit(case.fn)(*case.args))
    want = jax.tree_util.tree_leaves(jax.jit(case.fn)(*case.args))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.abs(w).max())
        )


@pytest.mark.parametrize("make", UNIT_DIM_NEAR_MISSES, ids=_name)
def test_a_near_miss_is_a_valid_program(make):
    test_moe_zoo_selfcheck.test_near_moe_miss_case(make)


@pytest.mark.parametrize("make", UNIT_DIM_NEAR_MISSES, ids=_name)
def test_a_near_miss_never_fuses_as_moe(make):
    test_moe_zoo.test_moe_near_miss_never_fuses_as_moe(make)
