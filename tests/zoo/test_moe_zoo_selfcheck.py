"""Self-check of the MoE block zoo itself (does not use moefuse).

Every MoE case runs under ``jax.jit`` with finite outputs and its output matches an independent,
straightforward numpy computation from ``case.ref``: route each token, then for each token and
each of its k experts apply that expert's FFN and add it with its weight (dropping choices over
capacity), plus the shared expert.  Near misses run under jit with finite outputs.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from . import NEAR_MISS
from .moe_blocks import ACTIVATIONS, ALL_MOE_BLOCKS, DISPATCHES, MOE, MOE_EXPECT_KEYS
from .moe_near_misses import NEAR_MOE_MISSES


def _make_name(make) -> str:
    assert make.__name__.startswith("make_"), make.__name__
    return make.__name__[len("make_") :]


def _float_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def _f64(a):
    if a is None:
        return None
    return np.asarray(jnp.asarray(a).astype(jnp.float32), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# independent reference (numpy, float64, one token at a time)
# ---------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _gelu(v, approximate):
    if approximate:
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))


def _softmax(v):
    v = v - v.max(axis=-1, keepdims=True)
    e = np.exp(v)
    return e / e.sum(axis=-1, keepdims=True)


def _sel(p, name, e):
    a = p[name]
    if a is None:
        return None
    a = _f64(a)
    return a if e is None else a[e]


def _ffn(h, p, e=None):
    """One FFN on one token h [D]; ``e`` selects the expert (None for a shared expert)."""

    def lin(w, b):
        y = h @ _sel(p, w, e)
        bias = _sel(p, b, e)
        return y if bias is None else y + bias

    act = p["activation"]
    if act in ("gelu", "relu"):
        a = lin("up", "up_b")
        a = _gelu(a, p["gelu_approximate"]) if act == "gelu" else np.maximum(a, 0.0)
    else:
        g, u = lin("gate", "gate_b"), lin("up", "up_b")
        if act == "swiglu":
            a = g * _sigmoid(g) * u
        elif act == "geglu":
            a = _gelu(g, p["gelu_approximate"]) * u
        elif act == "swiglu_oai":
            g = np.minimum(g, p["limit"])
            u = np.clip(u, -p["limit"], p["limit"])
            a = g * _sigmoid(p["alpha"] * g) * (u + 1.0)
        else:
            raise AssertionError(act)
    y = a @ _sel(p, "down", e)
    bias = _sel(p, "down_b", e)
    return y if bias is None else y + bias


def _route(x, r):
    """weights [T, k], ids [T, k] (ids in descending order of the selection score)."""
    logits = x @ _f64(r["w"])
    if r["logit_bias"] is not None:
        logits = logits + _f64(r["logit_bias"])
    k = r["k"]
    if r["order"] == "topk_then_score":
        ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(logits, ids, axis=-1)
        return (_sigmoid(top) if r["score"] == "sigmoid" else _softmax(top)), ids
    scores = _softmax(logits) if r["score"] == "softmax" else _sigmoid(logits)
    choice = scores.copy() if r["selection_bias"] is None else scores + _f64(r["selection_bias"])
    if r["n_group"] > 1:
        t, n_e = choice.shape
        grouped = choice.reshape(t, r["n_group"], n_e // r["n_group"])
        if r["group_score"] == "top2_sum":
            gs = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        else:
            gs = grouped.max(-1)
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, : r["topk_group"]]
        gmask = np.zeros_like(gs, dtype=bool)
        np.put_along_axis(gmask, keep, True, axis=-1)
        choice = np.where(np.repeat(gmask, n_e // r["n_group"], axis=-1), choice, -np.inf)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(scores, ids, axis=-1)
    if r["renorm"]:
        w = w / w.sum(-1, keepdims=True)
    if r["scale"] is not None:
        w = w * r["scale"]
    return w, ids


def _kept(ids, cap):
    """Which (token, choice) pairs fit in their expert's capacity."""
    t, k = ids.shape
    if cap is None:
        return np.ones((t, k), bool)
    kept = np.zeros((t, k), bool)
    group = t // cap["groups"]
    for g in range(cap["groups"]):
        toks = range(g * group, (g + 1) * group)
        if cap["order"] == "token_major":
            order = [(i, j) for i in toks for j in range(k)]
        else:
            order = [(i, j) for j in range(k) for i in toks]
        used = collections.Counter()
        for i, j in order:
            e = int(ids[i, j])
            if used[e] < cap["capacity"]:
                kept[i, j] = True
            used[e] += 1
    return kept


def _moe_block(x, block):
    w, ids = _route(x, block["router"])
    kept = _kept(ids, block["capacity"])
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if kept[t, j] and block.get("weights_on_input"):
                out[t] += _ffn(w[t, j] * x[t], block["experts"], int(ids[t, j]))
            elif kept[t, j]:
                out[t] += w[t, j] * _ffn(x[t], block["experts"], int(ids[t, j]))
        shared = block["shared"]
        if shared is not None:
            s = _ffn(x[t], shared)
            if shared["sigmoid_gate"] is not None:
                s = s * _sigmoid(x[t] @ _f64(shared["sigmoid_gate"]))[0]
            out[t] += s
    return out, kept


def _reference(ref):
    h = _f64(ref["x"])
    all_kept = []
    for block in ref["blocks"]:
        y, kept = _moe_block(h, block)
        all_kept.append(kept)
        h = h + y if ref["residual"] else y
    return h, all_kept


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_minimum_counts():
    cases = [m() for m in ALL_MOE_BLOCKS]
    assert len(cases) >= 18
    assert len(NEAR_MOE_MISSES) >= 6
    dispatch = collections.Counter(c.expect["dispatch"] for c in cases)
    activation = collections.Counter(c.expect["activation"] for c in cases)
    assert set(dispatch) == set(DISPATCHES), dispatch
    assert set(activation) == set(ACTIVATIONS), activation
    assert sum(c.expect["shared_expert"] for c in cases) >= 2
    bf16 = [c for c in cases if any(jnp.asarray(a).dtype == jnp.bfloat16 for a in jax.tree.leaves(c.args))]
    assert len(bf16) >= 3


def test_names_unique():
    names = [_make_name(m) for m in ALL_MOE_BLOCKS + NEAR_MOE_MISSES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("make", ALL_MOE_BLOCKS, ids=_make_name)
def test_moe_case(make):
    case = make()
    assert case.name == _make_name(make)
    assert case.family == MOE
    assert set(case.expect) == MOE_EXPECT_KEYS
    exp = case.expect
    assert exp["activation"] in ACTIVATIONS and exp["dispatch"] in DISPATCHES
    assert 1 <= exp["k"] <= exp["num_experts"]
    assert (exp["capacity"] is not None) == (exp["dispatch"] == "capacity")
    assert case.count >= 1 and case.note

    # `expect` agrees with the canonical description
    ref = case.ref
    for block in ref["blocks"]:
        assert block["router"]["k"] == exp["k"]
        assert block["router"]["w"].shape[-1] == exp["num_experts"]
        assert block["experts"]["up"].shape[0] == exp["num_experts"]
        assert block["experts"]["activation"] == exp["activation"]
        assert (block["shared"] is not None) == exp["shared_expert"]
        cap = block["capacity"]
        assert (None if cap is None else cap["capacity"]) == exp["capacity"]

    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: the f32 tolerance is tight
        out = jax.jit(case.fn)(*case.args)
    for leaf in _float_leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float32))), case.name

    y = out[0] if isinstance(out, tuple) else out
    x = ref["x"]
    assert y.shape[-1] == x.shape[-1] and math.prod(y.shape[:-1]) == x.shape[0]
    got = np.asarray(jnp.asarray(y).astype(jnp.float32), dtype=np.float64).reshape(x.shape)
    want, kept = _reference(ref)
    if exp["dispatch"] == "capacity":
        assert not all(k.all() for k in kept), "capacity case drops no token"
    low_precision = y.dtype == jnp.bfloat16 or any(
        jnp.asarray(a).dtype == jnp.bfloat16 for a in jax.tree.leaves(case.args)
    )
    # f32: tight enough to tell exact from tanh gelu (~2e-4 apart here); bf16: rounding of activations
    tol = 2e-2 if low_precision else 2e-5
    scale = float(np.abs(want).max())
    assert scale > 0.1, "degenerate case: output is ~0"
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, (case.name, err, scale)


@pytest.mark.parametrize("make", NEAR_MOE_MISSES, ids=_make_name)
def test_near_moe_miss_case(make):
    case = make()
    assert case.name == _make_name(make)
    assert case.family == NEAR_MISS
    assert case.expect == {}
    assert case.count == 0
    assert case.note
    out = jax.jit(case.fn)(*case.args)
    for leaf in _float_leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float32))), case.name
