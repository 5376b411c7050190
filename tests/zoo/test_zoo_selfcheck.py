"""Self-check of the zoo itself (does not use moefuse): every case runs under jax.jit, outputs are
finite, metadata is well formed and the minimum case counts are met."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from . import EXPECT_KEYS, FAMILIES, NEAR_MISS
from .near_misses import NEAR_MISSES
from .routers import ALL_ROUTERS


def _make_name(make) -> str:
    assert make.__name__.startswith("make_"), make.__name__
    return make.__name__[len("make_") :]


def _float_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def test_minimum_counts():
    cases = [m() for m in ALL_ROUTERS]
    assert len(cases) >= 20
    per_family = collections.Counter(c.family for c in cases)
    for fam in FAMILIES:
        assert per_family[fam] >= 3, (fam, per_family)
    assert len(NEAR_MISSES) >= 10


def test_names_unique():
    names = [_make_name(m) for m in ALL_ROUTERS + NEAR_MISSES]
    assert len(names) == len(set(names))


def _is_router_output(out, k) -> bool:
    return (
        isinstance(out, tuple)
        and len(out) == 2
        and jnp.issubdtype(out[1].dtype, jnp.integer)
        and out[0].shape == out[1].shape
        and out[1].shape[-1] == k
    )


@pytest.mark.parametrize("make", ALL_ROUTERS, ids=_make_name)
def test_router_case(make):
    case = make()
    assert case.name == _make_name(make)
    assert case.family in FAMILIES
    assert set(case.expect) == EXPECT_KEYS
    exp = case.expect
    assert exp["score"] in ("softmax", "sigmoid", "none")
    assert exp["order"] in ("score_then_topk", "topk_then_score")
    assert 1 <= exp["k"] <= exp["num_experts"]
    assert exp["num_experts"] % exp["n_group"] == 0
    assert 1 <= exp["topk_group"] <= exp["n_group"]
    assert case.count >= 1
    assert case.note

    out = jax.jit(case.fn)(*case.args)
    for leaf in _float_leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float32))), case.name

    # Cases that return the raw router outputs (weights, ids): check them against `expect`.
    # (Model cases return something else: a hidden state, stacked ids, an LM-head candidate list.)
    if _is_router_output(out, exp["k"]):
        weights, ids = (np.asarray(o) for o in out)
        k, num_experts = exp["k"], exp["num_experts"]
        assert ids.dtype == np.int32
        assert ids.min() >= 0 and ids.max() < num_experts
        flat = ids.reshape(-1, k)
        assert all(len(set(row.tolist())) == k for row in flat), "duplicate expert in a row"
        if exp["n_group"] > 1:
            group_of = flat // (num_experts // exp["n_group"])
            assert all(len(set(row.tolist())) <= exp["topk_group"] for row in group_of)
        w = weights.astype(np.float32)
        assert np.all(w >= 0)
        if not exp["expert_scale"] and (exp["renorm"] or exp["order"] == "topk_then_score"):
            target = 1.0 if exp["scale"] is None else exp["scale"]
            tol = 2e-2 * target if weights.dtype != np.float32 else 1e-4 * target
            np.testing.assert_allclose(w.sum(-1), target, atol=tol)


@pytest.mark.parametrize("make", NEAR_MISSES, ids=_make_name)
def test_near_miss_case(make):
    case = make()
    assert case.name == _make_name(make)
    assert case.family == NEAR_MISS
    assert case.expect == {}
    assert case.count == 0
    assert case.note
    out = jax.jit(case.fn)(*case.args)
    for leaf in _float_leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float32))), case.name
