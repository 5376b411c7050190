"""Self-check of the fourth blind MoE batch (``moe_blocks_blind4.py``), without moefuse.

Each block runs under ``jax.jit`` and must equal an independent float64 numpy reference built from the
case's canonical :class:`Block4Ref`: route one token at a time (blind3's routings, plus sigmoid of the
chosen logits and PhiMoE's SparseMixer, see :class:`Router4Ref`), then for each token and each chosen
expert apply that expert's FFN, either to the token with the output weighted or, for
``weights_on_input``, to the weighted token with the output unweighted; plus the shared expert. The FFN
and blind3's routings come from ``test_moe_blind3_selfcheck``.

The reference also confirms that the corner each case claims happens on its inputs: for weights on the
input, that weighting the output instead would give a clearly different result; for SparseMixer, that
some slot's softmax runs over more than one expert (a weight that is neither 1 nor a plain softmax); and
for every case, that no choice is a near tie (the k-th and the next candidate differ by more than 1e-4,
and no SparseMixer ratio sits within 1e-4 of its threshold), so the ids do not depend on rounding.

Tolerances as blind3: relative to the largest reference output, float32 1e-4, bfloat16 4e-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pytest

from .moe_blocks_blind4 import BLIND4_MOE_BLOCKS, Block4Ref, Router4Ref
from .test_moe_blind3_selfcheck import ACTIVATIONS, TOLERANCE, _f64, _ffn, _name, _route, _sigmoid, _top

# the slow tier, beside the runs of this zoo through moefuse (tests/patterns/test_moe_blind*.py)
pytestmark = pytest.mark.slow

EXPECT_KEYS = {"k", "num_experts", "activation", "shared_expert", "capacity", "weights_on_input"}
NEAR_TIE = 1e-4


@dataclass
class Routed4:
    """One token's choice: ids (best first), weights, and what the corner checks need."""

    ids: list[int]
    weights: list[float]
    margin: float  # how far the choice is from flipping (a gap between scores, or from a threshold)
    mixed: bool = False  # SparseMixer: a slot's softmax ran over more than one expert


def _gap(v: np.ndarray, k: int) -> float:
    """The gap between the k-th largest value and the next one (inf when all are chosen)."""
    s = np.sort(v)[::-1]
    return float(s[k - 1] - s[k]) if k < len(s) else np.inf


def _sparsemixer(logits: np.ndarray, eps: float) -> Routed4:
    """PhiMoE's inference-path top-2, as :class:`Router4Ref` describes it."""
    ids, weights, margin, mixed = [], [], np.inf, False
    live = np.ones(len(logits), bool)
    for _ in range(2):
        m = logits[live].max()
        i = int(np.flatnonzero(live & (logits == m))[0])
        ratio = (m - logits) / np.maximum(np.abs(logits), m)
        keep = live & (ratio <= 2 * eps)
        weights.append(float(np.exp(logits[i]) / np.exp(logits[keep]).sum()))
        ids.append(i)
        margin = min(margin, float(np.abs(ratio[live] - 2 * eps).min()), _gap(logits[live], 1))
        mixed |= keep.sum() > 1
        live[i] = False
    return Routed4(ids, weights, margin, mixed)


def route4(r: Router4Ref, logits: np.ndarray) -> Routed4:
    """One token's routing in float64."""
    if r.order == "sparsemixer":
        assert r.k == 2
        return _sparsemixer(logits, r.jitter_eps)
    if r.order == "topk_then_score" and r.score == "sigmoid":
        ids = _top(logits, r.k)
        return Routed4(ids, list(_sigmoid(logits[ids])), _gap(logits, r.k))
    assert r.selection_bias is None and r.n_group == 1  # blind4 routers rank the plain scores
    routed = _route(r, logits)
    ranked = logits if r.order == "topk_then_score" or r.score == "sigmoid" else np.exp(logits - logits.max())
    return Routed4(routed.ids, routed.weights, _gap(ranked / np.abs(ranked).max(), r.k))


@dataclass
class Reference4:
    y: np.ndarray  # [T, D]
    y_other_side: np.ndarray  # [T, D], the block with the routing weight on the other side of the FFN
    ids: np.ndarray  # [T, k]
    min_margin: float
    mixed: int


def reference(ref: Block4Ref) -> Reference4:
    assert ref.capacity is None
    x = ref.x.reshape(-1, ref.x.shape[-1])
    logits = x @ ref.router.w
    ys, others, all_ids, margins, mixed = [], [], [], [], 0
    for t in range(x.shape[0]):
        routed = route4(ref.router, logits[t])
        on_input = sum(_ffn(ref.experts, x[t] * w, e) for e, w in zip(routed.ids, routed.weights))
        on_output = sum(w * _ffn(ref.experts, x[t], e) for e, w in zip(routed.ids, routed.weights))
        y, other = (on_input, on_output) if ref.weights_on_input else (on_output, on_input)
        if ref.shared is not None:
            s = _ffn(ref.shared, x[t], None)
            s = s if ref.shared_gate is None else _sigmoid(x[t] @ ref.shared_gate) * s
            y, other = y + s, other + s
        ys.append(y)
        others.append(other)
        all_ids.append(routed.ids)
        margins.append(routed.margin)
        mixed += routed.mixed
    return Reference4(np.array(ys), np.array(others), np.array(all_ids), min(margins), mixed)


def assert_names_and_expect(blocks: list, sizes: range) -> None:
    """A batch of len in `sizes` with distinct names, each case's `expect` matching its canonical ref."""
    names = [_name(m) for m in blocks]
    assert len(names) in sizes and len(names) == len(set(names))
    for make in blocks:
        case = make()
        assert case.name == _name(make)
        assert set(case.expect) == EXPECT_KEYS and case.expect["activation"] in ACTIVATIONS
        assert (
            case.expect["k"] == case.ref.router.k and case.expect["num_experts"] == case.ref.router.w.shape[1]
        )
        assert case.expect["shared_expert"] == (case.ref.shared is not None)
        assert case.expect["capacity"] == case.ref.capacity
        assert case.expect["activation"] == case.ref.experts.activation
        assert case.expect["weights_on_input"] == case.ref.weights_on_input


def assert_block_matches(case, ref) -> float:
    """The block under jax.jit equals `ref` (its output within TOLERANCE of the output's scale, its ids
    exactly), its tokens do not all choose the same experts and no choice is a near tie; returns the
    tolerance used."""
    out = jax.jit(case.fn)(*case.args)
    outs = out if case.ref.outputs else (out,)
    y = outs[0]
    assert y.shape == case.ref.x.shape
    got = _f64(y).reshape(ref.y.shape)
    scale = np.abs(ref.y).max()
    assert scale > 0.1
    tol = TOLERANCE[y.dtype] * scale
    np.testing.assert_allclose(got, ref.y, rtol=0, atol=tol)
    for name, value in zip(case.ref.outputs, outs[1:]):
        assert name == "ids"
        np.testing.assert_array_equal(np.asarray(value).reshape(ref.ids.shape), ref.ids)
    assert len({tuple(sorted(r)) for r in ref.ids}) > 1
    assert ref.min_margin > NEAR_TIE
    return tol


def test_blind4_names_and_expect():
    assert_names_and_expect(BLIND4_MOE_BLOCKS, range(12, 17))


@pytest.mark.parametrize("make", BLIND4_MOE_BLOCKS, ids=_name)
def test_blind4_block_matches_reference(make):
    case = make()
    ref = reference(case.ref)
    tol = assert_block_matches(case, ref)
    # the claimed corners happen
    if case.ref.weights_on_input:
        assert np.abs(ref.y_other_side - ref.y).max() > 10 * tol
    if case.ref.router.order == "sparsemixer":
        assert ref.mixed > 0
