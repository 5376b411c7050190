"""Self-check of the second blind MoE block batch (``moe_blocks_blind2.py``), reusing the zoo's checker."""

from __future__ import annotations

import collections

import pytest

from .moe_blocks import ALL_MOE_BLOCKS, DISPATCHES
from .moe_blocks_blind2 import BLIND2_MOE_BLOCKS
from .test_moe_zoo_selfcheck import _make_name
from .test_moe_zoo_selfcheck import test_moe_case as _check_moe_case

# the slow tier, beside the runs of this zoo through moefuse (tests/patterns/test_moe_blind*.py)
pytestmark = pytest.mark.slow


def test_blind2_names_unique_and_coverage():
    names = [_make_name(m) for m in BLIND2_MOE_BLOCKS]
    assert len(names) == len(set(names)) == 12
    assert not set(names) & {_make_name(m) for m in ALL_MOE_BLOCKS}
    dispatch = collections.Counter(m().expect["dispatch"] for m in BLIND2_MOE_BLOCKS)
    assert set(dispatch) == set(DISPATCHES), dispatch


@pytest.mark.parametrize("make", BLIND2_MOE_BLOCKS, ids=_make_name)
def test_blind2_moe_case(make):
    _check_moe_case(make)
