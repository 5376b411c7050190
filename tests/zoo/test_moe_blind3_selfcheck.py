"""Self-check of the third blind MoE batch (``moe_blocks_blind3.py``), without moefuse.

Each block runs under ``jax.jit`` and must equal an independent float64 numpy reference built from
the case's canonical :class:`BlockRef`: route one token at a time (score, optional groups, pick k
with ties to the lower id, post steps), then for each token and each chosen expert apply that
expert's FFN and add it with its weight (choices over capacity dropped), plus the shared expert.
The reference also reports whether the corner each case claims to exercise happens on its inputs
(a token whose choice changes with the selection bias or the group limit, a dropped choice), so a
case cannot silently test less than it says.

Tolerances, relative to the largest reference output: float32 1e-4 (unit roundoff 6e-8, reductions
of at most 128 terms through three matmuls stay well under it); bfloat16 4e-2 (unit roundoff 3.9e-3;
the block rounds activations, hidden states, expert outputs and weights to bf16, each a few ulps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .moe_blocks_blind3 import BLIND3_MOE_BLOCKS, BlockRef, FfnRef, RouterRef

# the slow tier, beside the runs of this zoo through moefuse (tests/patterns/test_moe_blind*.py)
pytestmark = pytest.mark.slow

TOLERANCE = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 4e-2}
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
EXPECT_KEYS = {"k", "num_experts", "activation", "shared_expert", "capacity"}


def _name(make) -> str:
    return make.__name__.removeprefix("make_")


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _gelu(v, approximate: bool):
    if approximate:
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    return np.array([0.5 * a * (1.0 + math.erf(a / math.sqrt(2.0))) for a in v])


def _ffn(f: FfnRef, h: np.ndarray, e: int | None) -> np.ndarray:
    """One FFN on one token h [D]; ``e`` picks the expert (None: a shared FFN)."""

    def pick(a):
        return None if a is None else (a if e is None else a[e])

    def lin(w, b):
        y = h @ pick(w)
        return y if b is None else y + pick(b)

    a = lin(f.up, f.up_b)
    if f.activation == "swiglu":
        g = lin(f.gate, f.gate_b)
        a = g * _sigmoid(g) * a
    elif f.activation == "geglu":
        a = _gelu(lin(f.gate, f.gate_b), f.gelu_approximate) * a
    elif f.activation == "gelu":
        a = _gelu(a, f.gelu_approximate)
    elif f.activation == "relu":
        a = np.maximum(a, 0.0)
    elif f.activation == "silu":
        a = a * _sigmoid(a)
    else:
        raise AssertionError(f.activation)
    y = a @ pick(f.down)
    return y if f.down_b is None else y + pick(f.down_b)


def _top(v: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest, largest first, ties to the lower index."""
    return sorted(range(len(v)), key=lambda i: (-v[i], i))[:k]


@dataclass
class Routed:
    ids: list[int]
    weights: list[float]
    bias_changed_choice: bool
    groups_changed_choice: bool


def _route(r: RouterRef, logits: np.ndarray) -> Routed:
    if r.order == "topk_then_score":
        ids = _top(logits, r.k)
        v = np.exp(logits[ids] - logits[ids].max())
        return Routed(ids, list(v / v.sum()), False, False)
    if r.score == "softmax":
        e = np.exp(logits - logits.max())
        scores = e / e.sum()
    else:
        scores = _sigmoid(logits)
    choice = scores if r.selection_bias is None else scores + r.selection_bias
    free = choice.copy()
    if r.n_group > 1:
        size = len(choice) // r.n_group
        group_score = [sum(sorted(choice[g * size : (g + 1) * size])[-2:]) for g in range(r.n_group)]
        kept = set(_top(np.array(group_score), r.topk_group))
        choice = np.array([c if i // size in kept else r.group_fill for i, c in enumerate(choice)])
    ids = _top(choice, r.k)
    w = scores[ids]
    if r.renorm:
        w = w / (w.sum() + r.renorm_eps)
    if r.scale is not None:
        w = w * r.scale
    return Routed(
        ids,
        list(w),
        bias_changed_choice=r.selection_bias is not None and set(_top(scores, r.k)) != set(_top(free, r.k)),
        groups_changed_choice=set(ids) != set(_top(free, r.k)),
    )


@dataclass
class Reference:
    y: np.ndarray  # [T, D]
    ids: np.ndarray  # [T, k]
    logits: np.ndarray  # [T, E]
    dropped: int
    bias_changed: int
    groups_changed: int


def reference(ref: BlockRef) -> Reference:
    x = ref.x.reshape(-1, ref.x.shape[-1])
    logits = x @ ref.router.w
    used: dict[int, int] = {}
    ys, all_ids, dropped, bias_changed, groups_changed = [], [], 0, 0, 0
    for t in range(x.shape[0]):
        routed = _route(ref.router, logits[t])
        y = np.zeros(x.shape[1])
        for e, w in zip(routed.ids, routed.weights):
            used[e] = used.get(e, 0) + 1
            if ref.capacity is not None and used[e] > ref.capacity:
                dropped += 1
                continue
            y = y + w * _ffn(ref.experts, x[t], e)
        if ref.shared is not None:
            s = _ffn(ref.shared, x[t], None)
            y = y + (s if ref.shared_gate is None else _sigmoid(x[t] @ ref.shared_gate) * s)
        ys.append(y)
        all_ids.append(routed.ids)
        bias_changed += routed.bias_changed_choice
        groups_changed += routed.groups_changed_choice
    return Reference(np.array(ys), np.array(all_ids), logits, dropped, bias_changed, groups_changed)


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32), dtype=np.float64)


def test_blind3_names_and_expect():
    names = [_name(m) for m in BLIND3_MOE_BLOCKS]
    assert 16 <= len(names) <= 24 and len(names) == len(set(names))
    for make in BLIND3_MOE_BLOCKS:
        case = make()
        assert case.name == _name(make)
        assert set(case.expect) == EXPECT_KEYS and case.expect["activation"] in ACTIVATIONS
        assert (
            case.expect["k"] == case.ref.router.k and case.expect["num_experts"] == case.ref.router.w.shape[1]
        )
        assert case.expect["shared_expert"] == (case.ref.shared is not None)
        assert case.expect["capacity"] == case.ref.capacity
        assert case.expect["activation"] == case.ref.experts.activation


@pytest.mark.parametrize("make", BLIND3_MOE_BLOCKS, ids=_name)
def test_blind3_block_matches_reference(make):
    case = make()
    ref = reference(case.ref)
    out = jax.jit(case.fn)(*case.args)
    outs = out if case.ref.outputs else (out,)
    y = outs[0]
    assert y.shape == case.ref.x.shape
    got = _f64(y).reshape(ref.y.shape)
    scale = np.abs(ref.y).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, ref.y, rtol=0, atol=TOLERANCE[y.dtype] * scale)
    for name, value in zip(case.ref.outputs, outs[1:]):
        if name == "ids":
            np.testing.assert_array_equal(np.asarray(value).reshape(ref.ids.shape), ref.ids)
        else:
            np.testing.assert_allclose(_f64(value).reshape(ref.logits.shape), ref.logits, rtol=0, atol=1e-4)
    # every token is not sent to the same experts, and the corners the case claims happen on its inputs
    assert len({tuple(sorted(r)) for r in ref.ids}) > 1
    r = case.ref.router
    if r.selection_bias is not None:
        assert ref.bias_changed > 0
    if r.n_group > 1:
        assert ref.groups_changed > 0
    if case.ref.capacity is not None:
        assert ref.dropped > 0
