"""Self-check of the fifth blind MoE batch (``moe_blocks_blind5.py``), without moefuse.

Each block runs under ``jax.jit`` and must equal an independent float64 numpy reference built from the
case's canonical :class:`Block4Ref`: route one token at a time (blind4's routings, see ``route4``, plus
the biased group-limited choice of :class:`Router5Ref`, written out here), then for each token sum the
chosen experts' FFN outputs times their weights, plus the (optionally gated) shared expert. The FFN comes
from ``test_moe_blind3_selfcheck``. No blind5 block weights the input.

The reference also confirms that no choice is a near tie (the k-th and the next candidate differ by more
than 1e-4, and so do the kept and the next group's scores), and that the bias and the group limit of a
group-limited router change some token's choice.

Tolerances as blind3: relative to the largest reference output, float32 1e-4, bfloat16 4e-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from .moe_blocks_blind5 import BLIND5_MOE_BLOCKS, Router5Ref
from .test_moe_blind3_selfcheck import _ffn, _name, _sigmoid, _top
from .test_moe_blind4_selfcheck import (
    Routed4,
    _gap,
    assert_block_matches,
    assert_names_and_expect,
    route4,
)

# the slow tier, beside the runs of this zoo through moefuse (tests/patterns/test_moe_blind*.py)
pytestmark = pytest.mark.slow


@dataclass
class Grouped:
    """One token's group-limited choice and whether the bias / the group limit changed it."""

    routed: Routed4
    bias_changed: bool
    groups_changed: bool


def _group_score(v: np.ndarray, how: str) -> float:
    return float(v.max()) if how == "max" else float(np.sort(v)[-2:].sum())


def route_groups(r: Router5Ref, logits: np.ndarray) -> Grouped:
    """Score all E, add the bias for the choice, keep the best groups, pick k, weights from the scores."""
    assert r.order == "score_then_topk"
    if r.score == "softmax":
        z = np.exp(logits - logits.max())
        scores = z / z.sum()
    else:
        scores = _sigmoid(logits)
    choice = scores if r.selection_bias is None else scores + r.selection_bias
    size = len(choice) // r.n_group
    groups = np.array(
        [_group_score(choice[g * size : (g + 1) * size], r.group_score) for g in range(r.n_group)]
    )
    kept = set(_top(groups, r.topk_group))
    limited = np.array([c if i // size in kept else r.group_fill for i, c in enumerate(choice)])
    ids = _top(limited, r.k)
    w = scores[ids]
    if r.renorm:
        w = w / (w.sum() + r.renorm_eps)
    if r.scale is not None:
        w = w * r.scale
    margin = min(_gap(limited[np.isfinite(limited)], r.k), _gap(groups, r.topk_group))
    return Grouped(
        Routed4(ids, list(w), margin),
        bias_changed=set(_top(scores, r.k)) != set(_top(choice, r.k)),
        groups_changed=set(ids) != set(_top(choice, r.k)),
    )


@dataclass
class Reference5:
    y: np.ndarray  # [T, D]
    ids: np.ndarray  # [T, k]
    min_margin: float
    bias_changed: int
    groups_changed: int


def reference(ref) -> Reference5:
    assert ref.capacity is None and not ref.weights_on_input
    r = ref.router
    x = ref.x.reshape(-1, ref.x.shape[-1])
    logits = x @ r.w
    ys, all_ids, margins, bias_changed, groups_changed = [], [], [], 0, 0
    for t in range(x.shape[0]):
        if r.n_group > 1:
            grouped = route_groups(r, logits[t])
            routed = grouped.routed
            bias_changed += grouped.bias_changed
            groups_changed += grouped.groups_changed
        else:
            routed = route4(r, logits[t])
        y = sum(w * _ffn(ref.experts, x[t], e) for e, w in zip(routed.ids, routed.weights))
        if ref.shared is not None:
            s = _ffn(ref.shared, x[t], None)
            y = y + (s if ref.shared_gate is None else _sigmoid(x[t] @ ref.shared_gate) * s)
        ys.append(y)
        all_ids.append(routed.ids)
        margins.append(routed.margin)
    return Reference5(np.array(ys), np.array(all_ids), min(margins), bias_changed, groups_changed)


def test_blind5_names_and_expect():
    assert_names_and_expect(BLIND5_MOE_BLOCKS, range(8, 11))


@pytest.mark.parametrize("make", BLIND5_MOE_BLOCKS, ids=_name)
def test_blind5_block_matches_reference(make):
    case = make()
    ref = reference(case.ref)
    assert_block_matches(case, ref)
    # the claimed corners happen
    if case.ref.router.selection_bias is not None:
        assert ref.bias_changed > 0
    if case.ref.router.n_group > 1:
        assert ref.groups_changed > 0
