"""Expert FFNs unrolled by a Python loop: over the experts, or over the k slots of each token.

    y = sum over e of weight_e[:, None] * FFN(x; W[e])          (looped_expert_outputs)
    (also in a layout with unit token dims: y [1, T, D] = sum of weight_e[:, :, None] * FFN_e(x)[None])
    y = sum over j of w[:, j, None] * FFN(x; W[ids[:, j]])       (slot_loop_outputs)

    ffn, weights, ids = looped_expert_outputs(view, y)
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from moefuse import idioms
from moefuse.patterns.activations import activation_of, scalar_operand
from moefuse.patterns.dots import column_slice, dot, down_labels, through_transpose
from moefuse.patterns.experts import ExpertFfn
from moefuse.view import View


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


def looped_expert_outputs(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, weights, ids) for y = sum over e in range(E) of weight_e[:, None] * FFN(x; W[e]).

    The Python-loop spelling (HF Mixtral / Qwen2-MoE ports): weight_e = sum(where(ids == e, w, 0), -1)
    and each expert's FFN reads the e-th slice of stacked weights. Every expert must appear once.
    y, the weights and the FFN's [T, D] result may hold the tokens with unit dims added ([1, T, D],
    ids [1, T, k]): each token's row then sits at the same place of each, in row-major order.
    """
    return _unrolled_sum(view, y, _loop_term, lambda stacks, ids: _shape(stacks[-1][0])[0])


def _unrolled_sum(view: View, y: Any, term_of: Any, count: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """A sum of unrolled terms, term_of(view, term) -> (index, key), one term for each index in
    range(count(stacks, ids)), all with the same key (x, weight stacks, activation, weights, ids)."""
    seen: dict[int, tuple] = {}
    for term in (t for t in _sum_terms(view, y) if view.scalar(t) != 0.0):
        got = term_of(view, term)
        if got is None or got[0] in seen:
            return None
        seen[got[0]] = got[1]
    if len(set(seen.values())) != 1:
        return None
    ((x, stacks, act, act_params, w, ids),) = set(seen.values())
    if sorted(seen) != list(range(count(stacks, ids))):
        return None
    (wg, wg_dims), up, (wd, wd_dims) = stacks if len(stacks) == 3 else (stacks[0], None, stacks[1])
    ffn = ExpertFfn(
        x=x,
        w_gate=wg,
        w_up=None if up is None else up[0],
        w_down=wd,
        activation=act,
        labels=("T0", "D"),
        w_gate_dims=wg_dims,
        w_up_dims=None if up is None else up[1],
        w_down_dims=wd_dims,
        act_params=act_params,
    )
    return ffn, w, ids


def _sum_terms(view: View, atom: Any) -> list[Any]:
    atom = view.canon(atom)
    if view.op(atom) == "add":
        return [t for a in view.args(atom) for t in _sum_terms(view, a)]
    return [atom]


def _loop_term(view: View, term: Any) -> tuple[int, tuple] | None:
    """(e, key) for term = weight_e[:, None] * FFN_e(x); key holds what must agree across experts.

    term [..T, D] may have unit token dims that weight_e [..T] and FFN_e(x) [T, D] lack or hold
    elsewhere (`_same_rows`)."""
    if view.op(term) != "mul" or len(_shape(term)) < 2:
        return None
    for wexp, cur in (view.args(term), view.args(term)[::-1]):
        we, dims = idioms.unexpand(view, wexp)
        if not _same_rows(term, we, dims, tokens_only=True):
            continue
        sel = loop_expert_weight(view, we)
        if sel is None:
            continue
        e, w, ids = sel
        out, out_dims = idioms.unexpand(view, cur)
        if len(_shape(out)) != 2 or not _same_rows(term, out, out_dims, tokens_only=False):
            continue
        down = _expert_slice_dot(view, out, e, contracted="F")
        if down is None:
            continue
        a, wd = down
        inner = activation_of(view, a)
        if inner is None:
            continue
        act, gate, up, act_params = inner
        g = _expert_slice_dot(view, gate, e, contracted="D")
        u = None if up is None else _expert_slice_dot(view, up, e, contracted="D")
        if g is None or (up is not None and (u is None or not view.same(u[0], g[0]))):
            continue
        stacks = (g[1], wd) if u is None else (g[1], u[1], wd)
        return e, (view.canon(g[0]), stacks, act, act_params, w, ids)
    return None


def _same_rows(term: Any, part: Any, dims: dict[int, int], tokens_only: bool) -> bool:
    """Whether `part`, expanded into `term` [..T, D] by `dims` (part dim -> term dim), puts its rows
    at term's token positions in the same row-major order: the expansion only adds unit dims.

    `part` is [..T] (tokens_only: a per-token weight) or [T, D] (an expert's output, D kept last).
    """
    n = len(_shape(term)) - 1  # term's token dims
    width = len(_shape(part)) - (0 if tokens_only else 1)
    if len(dims) != len(_shape(part)) or any(dims[i] >= n for i in range(width)):
        return False
    if not tokens_only and (width != 1 or dims[1] != n or _shape(part)[1] != _shape(term)[n]):
        return False
    return math.prod(_shape(part)[:width]) == math.prod(_shape(term)[:n])


def loop_expert_weight(view: View, atom: Any) -> tuple[int, Any, Any] | None:
    """(e, w, ids) for atom[..t] = sum_j [ids[..t, j] == e] * w[..t, j].

    Spelled `sum(where(ids == e, w, 0), -1)`, `sum(w * (ids == e), -1)` (ids [..T, k], any number of
    token dims), or a contraction of w [T, k] with expert e's column of `one_hot(ids, E)`
    (`einsum('kt,tk->t', one_hot(ids).T[e], w)`, HF Qwen2-MoE).
    The multiplying spellings differ from the fused op only for an infinite weight (inf * 0 is NaN).
    """
    rank = len(_shape(atom)) + 1  # of ids and w
    atom = view.uncast(atom)  # jnp.sum of bf16 values: summed in f32 and cast back (one nonzero term)
    if view.op(atom) == "reduce_sum" and tuple(view.params(atom)["axes"]) == (rank - 1,):
        inner = view.uncast(view.args(atom)[0])
        per_token = ("T",) * (rank - 1) + ("K",)
        if view.op(inner) == "select_n":
            pred, on_false, on_true = view.args(inner)
            col = _onehot_column(view, pred)
            if view.scalar(on_false) == 0.0 and col is not None and col[2] == per_token:
                return (col[1], view.canon(on_true), col[0]) if _shape(col[0]) == _shape(on_true) else None
        if view.op(inner) == "mul":
            for m, w in (view.args(inner), view.args(inner)[::-1]):
                col = _onehot_column(view, m)
                if col is not None and col[2] == per_token and _shape(col[0]) == _shape(w):
                    return col[1], view.canon(w), col[0]
        return None
    got = dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for m, w, mc, wc, mb, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        col = _onehot_column(view, m)
        if col is None or len(_shape(w)) != 2 or _shape(col[0]) != _shape(w):
            continue
        ids, e, labels = col
        if (tuple(wc), tuple(wb)) == ((1,), (0,)) and (tuple(mc), tuple(mb)) == (
            (labels.index("K"),),
            (labels.index("T"),),
        ):
            return e, view.canon(w), ids
    return None


def _onehot_column(view: View, atom: Any) -> tuple[Any, int, tuple[str, ...]] | None:
    """(ids, e, labels) if atom is `ids == e` for ids [..T, K], with its dims labelled "T" and "K".

    Spelled `ids == e` (any cast) or as expert e's slice of a (transposed) `one_hot(ids, E)`.
    """
    atom = view.canon(atom)
    if view.op(atom) == "convert_element_type":
        atom = view.args(atom)[0]
    if view.op(atom) == "eq":
        got = scalar_operand(view, atom)
        if got is None or not jnp.issubdtype(got[0].aval.dtype, jnp.integer):
            return None
        rank = len(_shape(got[0]))
        if rank >= 2 and float(got[1]).is_integer():
            return got[0], int(got[1]), ("T",) * (rank - 1) + ("K",)
        return None
    sq = view.producer(atom)
    if sq is None or sq.primitive.name != "squeeze" or len(sq.params["dimensions"]) != 1:
        return None
    cut = column_slice(view, sq.invars[0])
    if cut is None or cut[1] != sq.params["dimensions"][0] or cut[2][1] - cut[2][0] != 1 or cut[2][2] != 1:
        return None
    base, perm = through_transpose(view, cut[0])
    oh = idioms.one_hot(view, base)
    if oh is None or len(_shape(oh[0])) != 2:
        return None
    labels = [("T", "K", "E")[p] for p in perm]
    if labels[cut[1]] != "E":
        return None
    del labels[cut[1]]
    return oh[0], cut[2][0], tuple(labels)


def _expert_slice_dot(view: View, atom: Any, e: int, contracted: str) -> tuple[Any, tuple] | None:
    """(lhs, (W, W labels)) for atom = lhs[T, n] . M where M is (a transpose of) W[e] of stacked W."""
    got = dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    if lb or rb or len(_shape(lhs)) != 2 or tuple(lc) != (1,) or len(_shape(rhs)) != 2:
        return None
    base, perm = through_transpose(view, rhs)
    sq = view.producer(base)
    if sq is None or sq.primitive.name != "squeeze" or tuple(sq.params["dimensions"]) != (0,):
        return None
    sl = view.producer(sq.invars[0])
    if sl is None or sl.primitive.name != "slice" or any(st != 1 for st in sl.params.get("strides") or ()):
        return None
    stacked = view.canon(sl.invars[0])
    if (
        sl.params["start_indices"][0] != e
        or sl.params["limit_indices"][0] != e + 1
        or len(_shape(stacked)) != 3
    ):
        return None
    if any(
        sl.params["start_indices"][d] != 0 or sl.params["limit_indices"][d] != _shape(stacked)[d]
        for d in (1, 2)
    ):
        return None
    w_dim = 1 + perm[rc[0]]  # the stacked weight's dim that the matmul contracts
    labels = ["E", "?", "?"]
    labels[w_dim] = contracted
    labels[3 - w_dim] = "F" if contracted == "D" else "D"
    return lhs, (stacked, tuple(labels))


def slot_column(view: View, atom: Any) -> tuple[Any, int] | None:
    """(a, j) if atom [T] is column j of a 2-D array a [T, K] (`a[:, j]`), looking through broadcasts;
    the column may keep its unit dim (`a[:, j:j + 1]`, broadcast along the features by a product)."""
    atom, dims = idioms.unexpand(view, atom)
    if dims.get(0) != 0:  # w[:, j, None]: the column must run along the tokens
        return None
    atom = view.canon(atom)
    sq = view.producer(atom)
    if (
        sq is not None
        and sq.primitive.name == "broadcast_in_dim"
        and tuple(sq.params["broadcast_dimensions"]) == (0, 1)
        and _shape(sq.invars[0])[1:] == (1,)
    ):
        atom = view.canon(sq.invars[0])  # [T, 1] broadcast along the features: the column itself
        sq = view.producer(atom)
    if sq is not None and sq.primitive.name == "squeeze" and tuple(sq.params["dimensions"]) == (1,):
        column = sq.invars[0]
    elif len(_shape(atom)) == 2 and _shape(atom)[1] == 1:
        column = atom
    else:
        return None
    cut = column_slice(view, column)
    if cut is None or cut[1] != 1 or len(_shape(cut[0])) != 2:
        return None
    start, limit, stride = cut[2]
    return (cut[0], start) if limit - start == 1 and stride == 1 else None


def slot_loop_outputs(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, weights, ids) for y = sum over slots j < K of w[:, j, None] * FFN(x; W[ids[:, j]]).

    The decode-style loop over the k slots: each slot gathers its experts' weights per token
    (`w_fc[ids[:, j]]`) and runs a batched matvec; every slot of the same ids and weights appears once.
    """
    return _unrolled_sum(view, y, _slot_term, lambda stacks, ids: _shape(ids)[1])


def _slot_term(view: View, term: Any) -> tuple[int, tuple] | None:
    """(j, key) for term = w[:, j, None] * FFN(x; W[ids[:, j]]); key must agree across slots."""
    if view.op(term) != "mul" or len(_shape(term)) != 2:
        return None
    for wexp, cur in (view.args(term), view.args(term)[::-1]):
        col = slot_column(view, wexp)
        down = _slot_matvec(view, view.uncast(cur))
        if col is None or down is None:
            continue
        h, wd, ids_j, wd_dims = down
        ids_col = slot_column(view, ids_j)
        inner = activation_of(view, h)
        if ids_col is None or ids_col[1] != col[1] or inner is None:
            continue
        act, gate, up, act_params = inner
        g = _slot_matvec(view, gate)
        u = None if up is None else _slot_matvec(view, up)
        if g is None or (up is not None and (u is None or not view.same(u[0], g[0]))):
            continue
        if any(not view.same(p[2], ids_j) for p in (g, u) if p is not None):
            continue
        stacks = ((g[1], g[3]),) + (() if u is None else ((u[1], u[3]),))
        stacks += ((wd, down_labels(wd_dims)),)
        return col[1], (view.canon(g[0]), stacks, act, act_params, col[0], ids_col[0])
    return None


def _slot_matvec(view: View, atom: Any) -> tuple[Any, Any, Any, tuple[str, ...]] | None:
    """(v, W, ids_j, W labels) for atom [T, out] = W[ids_j] @ v per token.

    Spelled `matmul(W[e], v[:, :, None])[..., 0]` or `einsum('tod,td->to', W[e], v)`; W's contracted
    dim is labelled "D", its output dim "F".
    """
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is not None and eqn.primitive.name == "squeeze" and len(_shape(eqn.invars[0])) == 3:
        if tuple(eqn.params["dimensions"]) != (2,):
            return None
        atom = view.canon(eqn.invars[0])
    got = dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    if tuple(lb) != (0,) or tuple(rb) != (0,) or len(lc) != 1:
        return None
    for g_side, v_side, gc, vc in ((lhs, rhs, lc, rc), (rhs, lhs, rc, lc)):
        taken = idioms.take(view, g_side)
        if taken is None or len(_shape(taken[0])) != 3 or len(_shape(taken[1])) != 1:
            continue
        v, dims = idioms.unexpand(view, v_side)
        if len(_shape(v)) != 2 or tuple(vc) != (1,) or dims.get(0) != 0 or dims.get(1) != 1:
            continue
        labels = ("E", "D", "F") if gc[0] == 1 else ("E", "F", "D")
        return v, taken[0], taken[1], labels
    return None
