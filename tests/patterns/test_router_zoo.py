"""The router spelling zoo and the near-miss zoo against the router pattern.

Every zoo spelling (written blind, from a description of MoE routers) must fuse with exactly
the parameters it was written with, give ids equal to the original (ties included) and weights
within tolerance; every near miss must not fuse. The few spellings moefuse declines on purpose
are listed in KNOWN_DECLINES with the reason it must give.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moefuse
from tests.zoo.near_misses import NEAR_MISSES
from tests.zoo.routers import ALL_ROUTERS

# Declined on purpose: fusing them could change a result. The reason must say so.
KNOWN_DECLINES = {
    "f2_gpt_oss": "runs in another dtype",
    "f3_dict_bf16_onehot": "one-hot contraction",
}

# Not fused yet although they should be: the true reason (an engine limit, not a router rule).
KNOWN_MISSES: dict[str, str] = {}

# Fused, but a step stays outside the fused op (exactly as the program wrote it): the per-expert
# scale read by `one_hot(ids) @ scale` is not a gather (inf/NaN scales would spread), so only
# the router before it is fused.
KNOWN_PARTIAL = {"f5_sigmoid_expert_scale": {"expert_scale": False}}


def _params_match(params: dict, expect: dict) -> list[str]:
    post = [tuple(s) for s in params["post"]]
    got = {
        "k": params["k"],
        "num_experts": params["num_experts"],
        "score": params["score"],
        "order": params["order"],
        "n_group": params["n_group"],
        "topk_group": params["topk_group"],
        "renorm": any(s[0] in ("renorm", "renorm_max") for s in post),
        "scale": next((s[1] for s in post if s[0] == "scale"), None),
        "selection_bias": params["selection_bias"],
        "expert_scale": any(s[0] == "expert_scale" for s in post),
    }
    if params["order"] == "topk_then_score":
        got["score"] = "softmax"
    bad = []
    for key, want in expect.items():
        have = got[key]
        if key == "scale" and want is not None and have is not None:
            if not np.isclose(have, want):
                bad.append(f"{key}: {have} != {want}")
        elif have != want:
            bad.append(f"{key}: {have!r} != {want!r}")
    return bad


def _router_params():
    for make in ALL_ROUTERS:
        name = make.__name__.removeprefix("make_")
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[name])] if name in KNOWN_MISSES else []
        yield pytest.param(make, id=name, marks=marks)


@pytest.mark.parametrize("make", list(_router_params()))
def test_router_spelling_fuses_exactly(make):
    case = make()
    plan = moefuse.plan(case.fn, *case.args)
    if case.name in KNOWN_DECLINES:
        assert not plan.fused, str(plan)
        assert any(KNOWN_DECLINES[case.name] in d.reason for d in plan.declined), str(plan)
        return
    assert len(plan.fused) == case.count, str(plan)
    for site in plan.fused:
        assert site.op == "route" and site.kernel == "xla"
        assert ":" in site.location and site.location.split(":")[-1].isdigit()
        problems = _params_match(site.params, {**case.expect, **KNOWN_PARTIAL.get(case.name, {})})
        assert not problems, f"{problems}\n{plan}"
    expected = jax.jit(case.fn)(*case.args)
    got = moefuse.jit(case.fn, verify=True)(*case.args)
    for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got), strict=True):
        e, g = np.asarray(e), np.asarray(g)
        assert e.dtype == g.dtype and e.shape == g.shape
        if np.issubdtype(e.dtype, np.integer):
            np.testing.assert_array_equal(g, e)


def test_router_rewrite_really_replaces_the_region():
    """The rewritten program calls the fused op and no longer contains the original top_k."""
    case = next(m for m in ALL_ROUTERS if m.__name__ == "make_f4_ling_hf_port")()
    top = [e.primitive.name for e in moefuse.rewritten_jaxpr(case.fn, *case.args).jaxpr.eqns]
    assert "top_k" not in top and "custom_vjp_call" in top, top
    original = [e.primitive.name for e in jax.make_jaxpr(case.fn)(*case.args).jaxpr.eqns]
    assert "top_k" in original and "custom_vjp_call" not in original


def test_zoo_is_big_enough():
    families = {m().family for m in ALL_ROUTERS}
    assert len(ALL_ROUTERS) >= 15 and families >= {"F1", "F2", "F3", "F4", "F5"}
    assert len(NEAR_MISSES) >= 8


@pytest.mark.parametrize("make", NEAR_MISSES, ids=lambda m: m.__name__.removeprefix("make_"))
def test_near_miss_never_fuses(make):
    case = make()
    plan = moefuse.plan(case.fn, *case.args)
    assert plan.fused == [], f"{case.note}\n{plan}"
    out = moefuse.jit(case.fn)(*case.args)
    ref = jax.jit(case.fn)(*case.args)
    for e, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
