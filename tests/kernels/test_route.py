"""Tests of the fused `route` op against routers written the way model authors write them.

The expected values never come from `route_reference`: they come from plain-jnp transliterations
of published routers (Mixtral/Qwen3, Switch, GPT-OSS, DeepSeek-V2/V3, Ling-2.6) and, for the
property test, from a numpy implementation of the `RouteParams` semantics. Expert ids must be
exactly equal (tie order included); weights equal within the dtype's tolerance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from moefuse.kernels.route import RouteParams, route

IMPLS = ("reference", "xla")
TOL = {np.dtype(jnp.float32): dict(rtol=1e-6, atol=1e-7), np.dtype(jnp.bfloat16): dict(rtol=1e-2, atol=1e-2)}
LING = dict(
    num_experts=256,
    k=8,
    score="sigmoid",
    selection_bias=True,
    n_group=8,
    topk_group=4,
    weights_from="scores",
    post=(("renorm", 1e-20), ("scale", 2.5)),
)


def _normal(seed, shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _route_jit(impl, logits, params, bias=None, expert_scale=None):
    f = jax.jit(lambda x, b, s: route(x, params, bias=b, expert_scale=s, impl=impl))
    return f(logits, bias, expert_scale)


def assert_same_routing(got, want):
    """ids exactly equal, weights (and exposed scores) equal within the dtype's tolerance, NaN == NaN."""
    assert len(got) == len(want)
    assert got[1].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    for g, w in zip(got[:1] + got[2:], want[:1] + want[2:], strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **TOL[g.dtype])


# ---- routers as model authors write them (T-major, [T, E]); jitted once, shared by both impls' tests


@functools.partial(jax.jit, static_argnames=("k", "norm_topk_prob"))
def mixtral_router(logits, k, norm_topk_prob=True):
    """Mixtral / Qwen3-MoE: softmax over experts, top-k, optionally renormalised."""
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts


@jax.jit
def switch_router(logits):
    """Switch Transformer: top-1 expert by argmax, gate = its probability."""
    probs = jax.nn.softmax(logits, axis=-1)
    expert = jnp.argmax(probs, axis=-1)
    gate = jnp.max(probs, axis=-1)
    return gate[:, None], expert[:, None].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="k")
def gpt_oss_router(logits, k):
    """GPT-OSS / Gemma style: top-k of the raw logits, softmax over the k chosen."""
    top_value, top_index = lax.top_k(logits, k)
    return jax.nn.softmax(top_value, axis=1), top_index


@functools.partial(
    jax.jit,
    static_argnames=(
        "top_k",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "routed_scaling_factor",
        "group_score",
        "fill",
    ),
)
def deepseek_v3_router(
    logits,
    e_score_correction_bias,
    *,
    top_k,
    n_group,
    topk_group,
    norm_topk_prob,
    routed_scaling_factor,
    group_score="top2_sum",
    fill=0.0,
):
    """HF DeepSeek-V3 `MoEGate` (noaux_tc), transliterated; group_score='max' / fill are variants."""
    t, e = logits.shape
    scores = jax.nn.sigmoid(logits)
    scores_for_choice = scores + e_score_correction_bias[None, :]
    per_group = scores_for_choice.reshape(t, n_group, -1)
    if group_score == "top2_sum":
        group_scores = lax.top_k(per_group, 2)[0].sum(axis=-1)
    else:
        group_scores = per_group.max(axis=-1)
    group_idx = lax.top_k(group_scores, topk_group)[1]
    group_mask = jnp.zeros_like(group_scores).at[jnp.arange(t)[:, None], group_idx].set(1)
    score_mask = jnp.broadcast_to(group_mask[:, :, None], (t, n_group, e // n_group)).reshape(t, e)
    tmp_scores = jnp.where(score_mask.astype(bool), scores_for_choice, fill)
    topk_idx = lax.top_k(tmp_scores, top_k)[1]
    topk_weight = jnp.take_along_axis(scores, topk_idx, axis=1)
    if norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(axis=-1, keepdims=True) + 1e-20)
    return topk_weight * routed_scaling_factor, topk_idx


@functools.partial(jax.jit, static_argnames=("top_k", "n_group", "topk_group", "routed_scaling_factor"))
def deepseek_v2_router(logits, *, top_k, n_group, topk_group, routed_scaling_factor):
    """HF DeepSeek-V2 `MoEGate` (group_limited_greedy), transliterated."""
    t, e = logits.shape
    scores = jax.nn.softmax(logits, axis=-1)
    group_scores = scores.reshape(t, n_group, -1).max(axis=-1)
    group_idx = lax.top_k(group_scores, topk_group)[1]
    group_mask = jnp.zeros_like(group_scores).at[jnp.arange(t)[:, None], group_idx].set(1)
    score_mask = jnp.broadcast_to(group_mask[:, :, None], (t, n_group, e // n_group)).reshape(t, e)
    tmp_scores = jnp.where(score_mask.astype(bool), scores, 0.0)
    topk_weight, topk_idx = lax.top_k(tmp_scores, top_k)
    return topk_weight * routed_scaling_factor, topk_idx


def ling_router(logits, bias, group_score="top2_sum", fill=0.0):
    return deepseek_v3_router(
        logits,
        bias,
        top_k=8,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        group_score=group_score,
        fill=fill,
    )


# ---- the published routers -------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("e,k", [(8, 2), (128, 8)])  # Mixtral, Qwen3-MoE
@pytest.mark.parametrize("renorm", [True, False])
def test_softmax_topk(impl, e, k, renorm):
    logits = _normal(0, (64, e), 2.0)
    params = RouteParams(num_experts=e, k=k, post=(("renorm", 0.0),) if renorm else ())
    assert_same_routing(_route_jit(impl, logits, params), mixtral_router(logits, k, renorm))


@pytest.mark.parametrize("impl", IMPLS)
def test_given_probabilities_clamped_renorm(impl):
    """score "none" + ("renorm_max", eps): top-k of probabilities computed elsewhere, / max(sum, eps),
    as EasyDeL's fused MoE writes it; rows of zeros keep zero weights instead of NaN."""
    probs = jax.nn.softmax(_normal(5, (64, 8), 2.0), axis=-1).at[:4].set(0.0)
    params = RouteParams(num_experts=8, k=2, score="none", post=(("renorm_max", 1e-8),))
    vals, ids = lax.top_k(probs, 2)
    want = (vals / jnp.maximum(jnp.sum(vals, -1, keepdims=True), 1e-8), ids)
    got = _route_jit(impl, probs, params)
    assert_same_routing(got, want)
    assert not np.isnan(np.asarray(got[0])).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_switch_top1(impl):
    logits = _normal(1, (64, 16), 2.0)
    assert_same_routing(_route_jit(impl, logits, RouteParams(num_experts=16, k=1)), switch_router(logits))


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_then_score(impl):
    logits = _normal(2, (64, 32), 2.0)
    params = RouteParams(num_experts=32, k=4, order="topk_then_score")
    assert_same_routing(_route_jit(impl, logits, params), gpt_oss_router(logits, 4))


@functools.partial(jax.jit, static_argnames="k")
def llama4_router(logits, k):
    """Llama4 (EasyDeL): top-k of the logits; the sigmoid of every logit kept at the chosen experts."""
    _, ids = lax.top_k(logits, k)
    chosen = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], ids].set(True)
    return jnp.where(chosen, jax.nn.sigmoid(logits), 0.0), ids


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_then_sigmoid_is_the_sigmoid_of_the_chosen_logits_bit_for_bit(impl):
    """order='topk_then_score' with a sigmoid: the weights are the sigmoid of every logit read at the
    ids, bit for bit, NaN, underflow to 0 and saturation to 1 included."""
    logits = _normal(30, (64, 16), 8.0).at[0, 3].set(jnp.nan).at[1].set(-200.0).at[2, :4].set(jnp.inf)
    logits = logits.at[3].set(60.0).at[4, 5].set(-jnp.inf)
    dense, ids = llama4_router(logits, 2)
    w, got_ids = _route_jit(impl, logits, RouteParams(num_experts=16, k=2, score="sigmoid",
                                                      order="topk_then_score"))
    np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(ids))
    want = np.take_along_axis(np.asarray(dense), np.asarray(ids), axis=-1)
    assert (want == 0).any() and np.isnan(want).any() and (want == 1).any()
    np.testing.assert_array_equal(np.asarray(w).view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("impl", IMPLS)
def test_sigmoid_bias_renorm_scale_no_groups(impl):
    # HF DeepSeek-V3 code with n_group=1 keeps the single group: the same router as no grouping.
    logits, bias = _normal(3, (64, 64), 2.0), _normal(4, (64,), 0.5)
    params = RouteParams(
        num_experts=64,
        k=6,
        score="sigmoid",
        selection_bias=True,
        weights_from="scores",
        post=(("renorm", 1e-20), ("scale", 2.5)),
    )
    want = deepseek_v3_router(
        logits, bias, top_k=6, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5
    )
    assert_same_routing(_route_jit(impl, logits, params, bias), want)
    # the bias changes the selection (so the test would notice it being ignored)
    assert np.any(np.asarray(want[1]) != np.asarray(lax.top_k(jax.nn.sigmoid(logits), 6)[1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("fill", [0.0, float("-inf")])
def test_group_limited_ling(impl, group_score, fill):
    logits = _normal(5, (128, 256), 2.0)
    bias = _normal(6, (256,), 0.5) - 1.5  # mostly negative selection values: group_fill 0.0 outranks them
    params = RouteParams(**LING, group_score=group_score, group_fill=fill)
    want = ling_router(logits, bias, group_score, fill)
    assert_same_routing(_route_jit(impl, logits, params, bias), want)
    # the test would notice grouping or the fill value being ignored
    ungrouped = lax.top_k(jax.nn.sigmoid(logits) + bias, 8)[1]
    assert np.any(np.asarray(want[1]) != np.asarray(ungrouped))
    groups_used = np.array([len(set(row)) for row in np.asarray(want[1]) // 32])
    if fill == 0.0:
        assert groups_used.max() > 4
    else:
        assert groups_used.max() <= 4


@pytest.mark.parametrize("impl", IMPLS)
def test_group_max_weights_from_selection_deepseek_v2(impl):
    logits = _normal(7, (64, 160), 2.0)
    params = RouteParams(
        num_experts=160,
        k=6,
        n_group=8,
        topk_group=3,
        group_score="max",
        group_fill=0.0,
        post=(("scale", 16.0),),
    )
    want = deepseek_v2_router(logits, top_k=6, n_group=8, topk_group=3, routed_scaling_factor=16.0)
    assert_same_routing(_route_jit(impl, logits, params), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_scale_post_order(impl):
    logits, expert_scale = _normal(8, (64, 16), 2.0), _normal(9, (16,), 1.0) + 1.0
    params = RouteParams(num_experts=16, k=4, post=(("renorm", 0.0), ("expert_scale",), ("scale", 3.0)))

    def model(x, s):
        weights, experts = mixtral_router(x, 4)
        return weights * s[experts] * 3.0, experts

    assert_same_routing(
        _route_jit(impl, logits, params, expert_scale=expert_scale), jax.jit(model)(logits, expert_scale)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["softmax", "ling", "topk_then_score"])
def test_expose_scores(impl, case):
    logits, bias = _normal(10, (32, 256), 2.0), _normal(11, (256,), 0.5)
    if case == "softmax":
        params, bias = RouteParams(num_experts=256, k=8, expose_scores=True), None
        want = jax.jit(lambda x: (*mixtral_router(x, 8, False), jax.nn.softmax(x, axis=-1)))(logits)
    elif case == "ling":
        params = RouteParams(**LING, group_fill=0.0, expose_scores=True)
        want = jax.jit(lambda x, b: (*ling_router(x, b), jax.nn.sigmoid(x)))(logits, bias)
    else:
        params, bias = RouteParams(num_experts=256, k=8, order="topk_then_score", expose_scores=True), None
        want = jax.jit(lambda x: (*gpt_oss_router(x, 8), jax.nn.softmax(x, axis=-1)))(logits)
    assert_same_routing(_route_jit(impl, logits, params, bias), want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 3, 256), (256,)])
def test_leading_dims(impl, shape):
    logits, bias = _normal(12, shape, 2.0), _normal(13, (256,), 0.5)
    params = RouteParams(**LING, group_fill=0.0)
    w, ids = ling_router(logits.reshape(-1, 256), bias)
    got = _route_jit(impl, logits, params, bias)
    assert got[0].shape == got[1].shape == shape[:-1] + (8,)
    assert_same_routing(got, (w.reshape(got[0].shape), ids.reshape(got[1].shape)))


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(impl):
    logits = _normal(14, (256, 256), 2.0, jnp.bfloat16)
    bias = _normal(15, (256,), 0.5, jnp.bfloat16)
    got = _route_jit(impl, logits, RouteParams(**LING, group_fill=0.0), bias)
    assert got[0].dtype == jnp.bfloat16
    assert_same_routing(got, ling_router(logits, bias))
    got = _route_jit(impl, logits, RouteParams(num_experts=256, k=8, post=(("renorm", 0.0),)))
    assert_same_routing(got, mixtral_router(logits, 8))


@pytest.mark.parametrize("impl", IMPLS)
def test_ties(impl):
    equal = jnp.zeros((4, 256))
    w, ids = _route_jit(impl, equal, RouteParams(num_experts=256, k=8))
    np.testing.assert_array_equal(np.asarray(ids), np.broadcast_to(np.arange(8), (4, 8)))
    # all groups tie: groups 0..3 kept, experts 0..7 chosen
    got = _route_jit(impl, equal, RouteParams(**LING, group_fill=0.0), jnp.zeros(256))
    np.testing.assert_array_equal(np.asarray(got[1]), np.broadcast_to(np.arange(8), (4, 8)))
    # many duplicated values (logits on a coarse grid), ties inside and between groups
    logits = jnp.asarray(np.round(_normal(16, (256, 256), 1.5)))
    bias = jnp.asarray(np.round(_normal(17, (256,), 2.0)) / 4)
    assert_same_routing(
        _route_jit(impl, logits, RouteParams(**LING, group_fill=0.0), bias), ling_router(logits, bias)
    )
    assert_same_routing(
        _route_jit(impl, logits, RouteParams(num_experts=256, k=8, post=(("renorm", 0.0),))),
        mixtral_router(logits, 8),
    )
    assert_same_routing(_route_jit(impl, logits, RouteParams(num_experts=256, k=1)), switch_router(logits))
    assert_same_routing(
        _route_jit(impl, logits, RouteParams(num_experts=256, k=8, order="topk_then_score")),
        gpt_oss_router(logits, 8),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_k_equals_num_experts_and_single_token(impl):
    logits = _normal(18, (1, 8), 2.0)
    got = _route_jit(impl, logits, RouteParams(num_experts=8, k=8, post=(("renorm", 0.0),)))
    assert_same_routing(got, mixtral_router(logits, 8))
    assert sorted(np.asarray(got[1])[0].tolist()) == list(range(8))
    # k == E with groups and -inf fill: the experts of dropped groups come last, by index
    logits, bias = _normal(19, (16, 8), 2.0), _normal(20, (8,), 0.5)
    params = RouteParams(
        num_experts=8,
        k=8,
        score="sigmoid",
        selection_bias=True,
        n_group=4,
        topk_group=2,
        group_fill=float("-inf"),
        weights_from="scores",
        post=(("renorm", 1e-20),),
    )
    want = deepseek_v3_router(
        logits,
        bias,
        top_k=8,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        fill=float("-inf"),
    )
    assert_same_routing(_route_jit(impl, logits, params, bias), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_logits(impl):
    nan, inf = float("nan"), float("inf")
    logits = np.array(_normal(21, (6, 256), 2.0))
    logits[0, 3] = nan
    logits[1, 5] = inf
    logits[2, 7] = -inf
    logits[3, :] = -inf
    logits[4, 100:140] = nan
    logits[5, ::3] = inf
    logits = jnp.asarray(logits)
    bias = _normal(22, (256,), 0.5)
    cases = [
        (RouteParams(**LING, group_fill=0.0), ling_router, (bias,)),
        (
            RouteParams(**LING, group_fill=float("-inf"), group_score="max"),
            lambda x, b: ling_router(x, b, "max", float("-inf")),
            (bias,),
        ),
        (RouteParams(num_experts=256, k=8, post=(("renorm", 0.0),)), lambda x: mixtral_router(x, 8), ()),
        (RouteParams(num_experts=256, k=8, order="topk_then_score"), lambda x: gpt_oss_router(x, 8), ()),
        (RouteParams(num_experts=256, k=1), switch_router, ()),
    ]
    for params, model, extra in cases:
        want = model(logits, *extra)
        assert_same_routing(_route_jit(impl, logits, params, *extra), want)


# ---- property test against a numpy implementation of the RouteParams semantics --------------------


def _np_top_k(x, k):
    """lax.top_k's order: descending in IEEE total order (+NaN first, -NaN last, +0 > -0), ties to the
    lower index."""
    bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    key = np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)
    ids = np.argsort(-key, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, ids, axis=-1), ids


_softmax, _sigmoid = jax.jit(jax.nn.softmax), jax.jit(jax.nn.sigmoid)


def numpy_route(logits, p, bias, expert_scale):
    """Selection and post-processing in numpy; the score functions are jax.nn's, as a model calls them."""
    x = np.asarray(logits)
    e = p.num_experts
    scores = None
    if p.order == "topk_then_score":
        v, ids = _np_top_k(x, p.k)
        if p.score == "sigmoid":
            w = np.asarray(_sigmoid(v))
        else:
            ev = np.exp((v - v[..., :1]).astype(np.float64))
            w = (ev / ev.sum(-1, keepdims=True)).astype(x.dtype)
        if p.expose_scores:
            scores = np.asarray((_sigmoid if p.score == "sigmoid" else _softmax)(logits))
    else:
        scores = {
            "softmax": lambda: np.asarray(_softmax(logits)),
            "sigmoid": lambda: np.asarray(_sigmoid(logits)),
            "none": lambda: x,
        }[p.score]()
        sel = scores + np.asarray(bias) if p.selection_bias else scores
        if p.n_group > 1:
            grouped = sel.reshape(*sel.shape[:-1], p.n_group, e // p.n_group)
            if p.group_score == "top2_sum":
                group_scores = np.sum(_np_top_k(grouped, 2)[0], axis=-1)
            else:
                group_scores = _np_top_k(grouped, 1)[0][..., 0]
            kept = np.zeros(group_scores.shape, bool)
            np.put_along_axis(kept, _np_top_k(group_scores, p.topk_group)[1], True, axis=-1)
            sel = np.where(np.repeat(kept, e // p.n_group, axis=-1), sel, np.asarray(p.group_fill, sel.dtype))
        top, ids = _np_top_k(sel, p.k)
        w = top if p.weights_from == "selection" else np.take_along_axis(scores, ids, axis=-1)
    for step in p.post:
        if step[0] == "renorm":
            with np.errstate(divide="ignore", invalid="ignore"):  # score 'none' weights may sum to 0
                w = w / (w.sum(-1, keepdims=True) + np.asarray(step[1], w.dtype))
        elif step[0] == "renorm_max":
            w = w / np.maximum(w.sum(-1, keepdims=True), np.asarray(step[1], w.dtype))
        elif step[0] == "scale":
            w = w * np.asarray(step[1], w.dtype)
        else:
            w = w * np.asarray(expert_scale)[ids]
    out = (jnp.asarray(w), jnp.asarray(ids.astype(np.int32)))
    return out + (jnp.asarray(scores),) if p.expose_scores else out


@st.composite
def route_cases(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    e = n_group * draw(st.integers(2, 8))
    scored_first = draw(st.booleans())
    grouped = scored_first and n_group > 1
    params = RouteParams(
        num_experts=e,
        k=draw(st.integers(1, e)),
        order="score_then_topk" if scored_first else "topk_then_score",
        score=draw(st.sampled_from(["softmax", "sigmoid"] + (["none"] if scored_first else []))),
        selection_bias=scored_first and draw(st.booleans()),
        n_group=n_group if grouped else 1,
        topk_group=draw(st.integers(1, n_group)) if grouped else 1,
        group_score=draw(st.sampled_from(["top2_sum", "max"])),
        group_fill=draw(st.sampled_from([0.0, float("-inf")])),
        weights_from=draw(st.sampled_from(["selection", "scores"])),
        post=tuple(
            draw(
                st.lists(
                    st.sampled_from([("renorm", 0.0), ("renorm", 1e-20), ("renorm_max", 1e-8), ("scale", 2.5),
                                     ("expert_scale",)]),
                    max_size=3,
                )
            )
        ),
        expose_scores=draw(st.booleans()),
    )
    shape = draw(st.sampled_from([(), (1,), (5,), (2, 3)])) + (e,)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # values on a grid: many exact ties, no near-ties that rounding could flip. Values that get
    # renormalised are kept positive (raw logits, selection values with a bias): a renorm of mixed signs
    # divides by a sum that can cancel to near zero, which amplifies any rounding (ill-conditioned, not
    # a semantic difference)
    renorms = any(step[0] in ("renorm", "renorm_max") for step in params.post)
    low = 1 if params.score == "none" and renorms else -8
    logits = jnp.asarray(rng.integers(low, 9, shape) / 4, jnp.float32)
    bias_low = 0 if renorms and params.weights_from == "selection" else -4
    bias = jnp.asarray(rng.integers(bias_low, 5, e) / 8, jnp.float32) if params.selection_bias else None
    expert_scale = jnp.asarray(rng.integers(1, 9, e) / 4, jnp.float32) if params.uses_expert_scale else None
    return params, logits, bias, expert_scale


# f32 only: under jit XLA keeps bf16 intermediates in f32 where fusion allows (excess precision), so
# bf16 selection values depend on how the surrounding program is fused; bf16 is tested above against
# model code jitted the same way.
@pytest.mark.slow  # 30 hypothesis examples, each compiled twice: ~1-2 min on 2 cores
@settings(max_examples=30, deadline=None)
@given(route_cases())
def test_matches_numpy_semantics(case):
    params, logits, bias, expert_scale = case
    want = numpy_route(logits, params, bias, expert_scale)
    for impl in IMPLS:
        assert_same_routing(_route_jit(impl, logits, params, bias, expert_scale), want)


# ---- gradients, transformations, lowering, validation ----------------------------------------------


def _scaled_by_expert(x, b, s):
    weights, experts = mixtral_router(x, 4)
    return weights * s[experts], experts


def _biased_selection_weights(x, b, s):
    # weights are the biased selection values: the bias does get a gradient
    weights, experts = lax.top_k(jax.nn.sigmoid(x) + b, 4)
    return weights / weights.sum(-1, keepdims=True), experts


def _sigmoid_with_scores(x, b, s):
    scores = jax.nn.sigmoid(x)
    return (*lax.top_k(scores, 4), scores)


GRAD_CASES = {
    "mixtral": (
        RouteParams(num_experts=16, k=4, post=(("renorm", 0.0),)),
        lambda x, b, s: mixtral_router(x, 4),
    ),
    "gpt_oss": (
        RouteParams(num_experts=16, k=4, order="topk_then_score"),
        lambda x, b, s: gpt_oss_router(x, 4),
    ),
    "llama4": (
        RouteParams(num_experts=16, k=4, score="sigmoid", order="topk_then_score"),
        lambda x, b, s: (lambda dense, ids: (jnp.take_along_axis(dense, ids, -1), ids))(*llama4_router(x, 4)),
    ),
    "ling": (RouteParams(**LING, group_fill=0.0), lambda x, b, s: ling_router(x, b)),
    "expert_scale": (
        RouteParams(num_experts=16, k=4, post=(("renorm", 0.0), ("expert_scale",))),
        _scaled_by_expert,
    ),
    "selection_bias": (
        RouteParams(num_experts=16, k=4, score="sigmoid", selection_bias=True, post=(("renorm", 0.0),)),
        _biased_selection_weights,
    ),
    "expose_scores": (
        RouteParams(num_experts=16, k=4, score="sigmoid", weights_from="scores", expose_scores=True),
        _sigmoid_with_scores,
    ),
}


# the reference's gradients in the slow tier (~10 s a case on 2 cores); the xla kernel's, which is
# the one that runs, stay in the default run
@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow), "xla"])
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_grad_matches_model(impl, case):
    params, model = GRAD_CASES[case]
    e = params.num_experts
    logits, bias, scale = _normal(23, (8, e), 2.0), _normal(24, (e,), 0.5), _normal(25, (e,)) + 1.0
    ct_w = _normal(26, (8, params.k))
    ct_s = _normal(27, (8, e))

    def loss(fn):
        def f(x, b, s):
            out = fn(x, b, s)
            return jnp.sum(out[0] * ct_w) + (jnp.sum(out[2] * ct_s) if len(out) == 3 else 0.0)

        return f

    def ours(x, b, s):
        return route(
            x,
            params,
            bias=b if params.selection_bias else None,
            expert_scale=s if params.uses_expert_scale else None,
            impl=impl,
        )

    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(logits, bias, scale)
    want = jax.jit(jax.grad(loss(model), argnums=(0, 1, 2)))(logits, bias, scale)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    assert np.any(np.asarray(got[0]) != 0)
    if case == "selection_bias":
        assert np.any(np.asarray(got[1]) != 0)


def test_vjp_with_integer_ids_cotangent():
    params = RouteParams(**LING, group_fill=0.0)
    logits, bias = _normal(28, (4, 256)), _normal(29, (256,))

    @jax.jit
    def grads(x, b):
        (w, ids), pullback = jax.vjp(lambda x, b: route(x, params, bias=b), x, b)
        return pullback((jnp.ones_like(w), np.zeros(ids.shape, jax.dtypes.float0)))

    g_logits, g_bias = grads(logits, bias)
    assert g_logits.shape == logits.shape and np.any(np.asarray(g_logits) != 0)
    np.testing.assert_array_equal(np.asarray(g_bias), 0.0)  # selection only: no gradient


def test_vmap_matches_batched():
    params = RouteParams(**LING, group_fill=0.0)
    logits, bias = _normal(30, (3, 5, 256), 2.0), _normal(31, (256,), 0.5)
    assert_same_routing(
        jax.jit(jax.vmap(lambda x: route(x, params, bias=bias)))(logits),
        _route_jit("xla", logits, params, bias),
    )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_impl_lowers(platform):
    params = RouteParams(**LING, group_fill=0.0)
    logits = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((256,), jnp.bfloat16)
    fwd = jax.jit(lambda x, b: route(x, params, bias=b))
    fwd = jax.export.export(fwd, platforms=(platform,))(logits, bias)
    assert [a.shape for a in fwd.out_avals] == [(64, 8), (64, 8)]
    grad = jax.jit(jax.grad(lambda x, b: jnp.sum(route(x, params, bias=b)[0].astype(jnp.float32))))
    assert jax.export.export(grad, platforms=(platform,))(logits, bias).out_avals[0].shape == (64, 256)


SCALED = RouteParams(num_experts=16, k=2, post=(("expert_scale",),))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=jnp.zeros((4, 8))), ValueError, "last dim must be num_experts=16"),
        (dict(logits=jnp.zeros((4, 16), jnp.int32)), TypeError, "floating point"),
        (
            dict(impl="pallas"),
            ValueError,
            r"unknown impl 'pallas'; valid: \['pallas_gpu', 'pallas_tpu', 'reference', 'xla'\]",
        ),
        (dict(bias=jnp.zeros(16)), ValueError, "bias was given but params do not use it"),
        (dict(params=RouteParams(num_experts=16, k=2, selection_bias=True)), ValueError, "need bias"),
        (
            dict(params=RouteParams(num_experts=16, k=2, selection_bias=True), bias=jnp.zeros(8)),
            ValueError,
            r"bias must have shape \(16,\)",
        ),
        (dict(params=SCALED), ValueError, "need expert_scale"),
        (dict(params=SCALED, expert_scale=jnp.ones((16, 1))), ValueError, r"must have shape \(16,\)"),
        (dict(params=SCALED, expert_scale=jnp.ones(16, jnp.int32)), TypeError, "expert_scale must be float"),
        (dict(params=RouteParams(num_experts=16, k=2, n_group=16)), ValueError, "2 experts per group"),
        (dict(params=dict(num_experts=16, k=2)), TypeError, "must be a RouteParams"),
    ],
)
def test_invalid_inputs(kwargs, error, match):
    call = dict(logits=jnp.zeros((4, 16)), params=RouteParams(num_experts=16, k=2), impl="xla") | kwargs
    with pytest.raises(error, match=match):
        route(call.pop("logits"), call.pop("params"), **call)
