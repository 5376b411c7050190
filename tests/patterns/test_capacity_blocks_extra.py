"""The MaxText-0.2.5-style capacity blocks of `tests/zoo/capacity_blocks_extra.py`, driven by the MoE zoo's
own checks: each block fuses whole as `moe` and matches `jax.jit` (dropped choices dropped exactly as
the program drops them); each near miss never fuses and declines for its reason."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moefuse
from tests.patterns import test_moe_zoo as moe_zoo
from tests.zoo import test_moe_zoo_selfcheck as selfcheck
from tests.zoo.capacity_blocks_extra import BATCH, CAPACITY_BLOCKS_EXTRA, CAPACITY_NEAR_MISSES_EXTRA


def _name(make) -> str:
    return make.__name__.removeprefix("make_")


@pytest.mark.parametrize("make", CAPACITY_BLOCKS_EXTRA, ids=_name)
def test_block_is_what_the_zoo_says(make):
    selfcheck.test_moe_case(make)  # drops choices, and matches the per-token numpy reference


@pytest.mark.parametrize("make", CAPACITY_BLOCKS_EXTRA, ids=_name)
def test_block_fuses_whole_and_matches_jit(make, monkeypatch):
    monkeypatch.setitem(moe_zoo.FUSED, _name(make), "capacity")
    moe_zoo.test_moe_block_spelling(make)  # one `moe` with the block's k, E, activation, C; its router
    case = make()
    (site,) = [s for s in moefuse.plan(case.fn, *case.args).fused if s.op == "moe"]
    assert (site.params["capacity_order"], site.params["capacity_groups"]) == ("token_major", BATCH)
    want = np.asarray(jax.jit(case.fn)(*case.args))
    got = np.asarray(jax.jit(moefuse.fuse(case.fn))(*case.args))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "reason"),
    list(
        zip(
            CAPACITY_NEAR_MISSES_EXTRA,
            [
                "off-by-one",
                "not 0 at the choices' other experts",
                "a slice of mask values",
                "weights written to experts by ids that may repeat",
                "may repeat an expert within a token",
            ],
            strict=True,
        )
    ),
    ids=lambda v: _name(v) if callable(v) else None,
)
def test_near_miss_never_fuses(make, reason):
    selfcheck.test_near_moe_miss_case(make)
    moe_zoo.test_moe_near_miss_never_fuses_as_moe(make)
    case = make()
    plan = moefuse.plan(case.fn, *case.args)
    assert any(reason in d.reason for d in plan.declined if d.op == "moe"), str(plan)
