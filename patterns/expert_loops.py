"""Expert FFNs unrolled by a Python loop: over the experts, or over the k slots of each token.

    y = sum over e of weight_e[:, None] * FFN(x; W[e])          (looped_expert_outputs)
    (W[e] the e-th slice of a stacked W, or expert e's arrays of its own: `PerExpertWeights`, biases
    likewise; also in a layout with unit token dims: y [1, T, D] = sum of weight_e[:, :, None] *
    FFN_e(x)[None]; each expert may read only its routed tokens: FFN_e(x * any(ids == e, -1)[:, None]))
    y = sum over e of FFN(x * weight_e[:, None]; W[e])           (the same, Llama4's weights on the input)
    y = sum over j of w[:, j, None] * FFN(x; W[ids[:, j]])       (slot_loop_outputs)

    ffn, weights, ids = looped_expert_outputs(view, y)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from moefuse import idioms
from moefuse.patterns.activations import activation_of, scalar_operand
from moefuse.patterns.dots import Bias, column_slice, dot, down_labels, through_transpose
from moefuse.patterns.experts import ExpertFfn, PerExpertWeights, RowScale
from moefuse.view import View


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


def looped_expert_outputs(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, weights, ids) for y = sum over e in range(E) of weight_e[:, None] * FFN(x; W_e).

    The Python-loop spelling (HF Mixtral / Qwen2-MoE ports, EasyDeL Grok-1 / PhiMoE): weight_e =
    sum(where(ids == e, w, 0), -1) (or a spelling of it, `loop_expert_weight`), and each expert's FFN
    reads its weights W_e either as the e-th slice of stacked weights or as arrays of its own (a model
    that keeps each expert as a module: separate inputs, constants or values computed before the
    block), per matrix and per bias (`x @ W_e + b_e`); the own arrays of all experts must agree in
    shape, dtype and layout, and expert e's come from the term whose weight selects `ids == e`
    (`PerExpertWeights`). Every expert e < E appears once: E is the stacked weights' expert dim, or the
    number of terms when every matrix is per expert (ids past the last expert contribute nothing, in
    the program and in the fused op). y, x, the weights and the FFN's result may hold the tokens with
    unit dims added ([1, T, D], ids [1, T, k]): each token's row then sits at the same place of each,
    in row-major order; the FFN's result may be cast before it is weighted (`ffn_precision` reads it).
    An expert may read x with the rows of the tokens not routed to it zeroed
    (`x * any(ids == e, -1)[:, None]`, `_routed_rows`): those rows are weighted by 0.
    Llama4's form (HF's loop): y = sum over e of FFN_e(x * weight_e[:, None]), each expert on the tokens
    scaled by their weight for it (its product maybe cast before the projections) and summed with weight
    1 (`_scaled_term`); the ffn then has a `row_scale`. It is the fused op's weights_on_input when the
    ids of a token are distinct (a `top_k`'s: weight_e is then one choice's weight or 0) and an expert
    on a zero row gives 0 (no biases: the caller declines those).
    """
    return _unrolled_sum(view, y, _loop_term, _num_experts)


def _num_experts(stacks: tuple, own_count: int, ids: Any) -> int:
    """E of a loop over experts: a stacked matrix's expert dim, else the number of terms."""
    stacked = [w for w, _ in stacks if not isinstance(w, _Own)]
    return _shape(stacked[0])[0] if stacked else own_count


@dataclasses.dataclass(frozen=True)
class _Own:
    """The key of a matrix or bias each term reads as an array of its own: what all of them must agree in."""

    shape: tuple[int, ...]
    dtype: Any


@dataclasses.dataclass(frozen=True)
class _TermKey:
    """What every term of an unrolled sum must agree in. `stacks` holds each matrix as (W, labels),
    `biases` each projection's bias as (B, labels) or None, W and B the stacked array or an `_Own`."""

    x: Any
    stacks: tuple
    biases: tuple
    activation: str
    act_params: tuple
    weights: Any
    ids: Any
    scale_dtype: Any = None  # weights on the input: the dtype the tokens are scaled in (else None)


def _unrolled_sum(view: View, y: Any, term_of: Any, count: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """A sum of unrolled terms of y's shape, term_of(view, term) -> (index, key, own), one term for
    each index in range(count(stacks, number of terms, ids)), all with the same `_TermKey`. A matrix or
    bias whose key is an `_Own` is read from each term's own array (own[m], matrices then biases)."""
    seen: dict[int, _TermKey] = {}
    owns: dict[int, tuple] = {}
    for term in (t for t in _sum_terms(view, y) if view.scalar(t) != 0.0):
        got = term_of(view, term) if _shape(term) == _shape(y) else None  # no term broadcast into y
        if got is None or got[0] in seen:
            return None
        seen[got[0]], owns[got[0]] = got[1], got[2]
    if len(set(seen.values())) != 1:
        return None
    (key,) = set(seen.values())
    if sorted(seen) != list(range(count(key.stacks, len(seen), key.ids))):
        return None
    order = sorted(owns)

    def resolved(m: int, part: Any) -> Any:
        return PerExpertWeights(tuple(owns[i][m] for i in order)) if isinstance(part, _Own) else part

    stacks = tuple((resolved(m, w_m), dims) for m, (w_m, dims) in enumerate(key.stacks))
    n = len(stacks)
    biases = tuple(
        None if b is None else Bias(resolved(n + m, b[0]), b[1], None) for m, b in enumerate(key.biases)
    )
    (wg, wg_dims), up, (wd, wd_dims) = stacks if n == 3 else (stacks[0], None, stacks[1])
    b_gate, b_up, b_down = biases if n == 3 else (biases[0], None, biases[1])
    ffn = ExpertFfn(
        x=key.x,
        w_gate=wg,
        w_up=None if up is None else up[0],
        w_down=wd,
        activation=key.activation,
        labels=("T0", "D"),
        w_gate_dims=wg_dims,
        w_up_dims=None if up is None else up[1],
        w_down_dims=wd_dims,
        biases=(b_gate, b_up, b_down),
        act_params=key.act_params,
        row_scale=None if key.scale_dtype is None else RowScale(key.weights, key.scale_dtype),
    )
    return ffn, key.weights, key.ids


def _sum_terms(view: View, atom: Any) -> list[Any]:
    atom = view.canon(atom)
    if view.op(atom) == "add":
        return [t for a in view.args(atom) for t in _sum_terms(view, a)]
    return [atom]


def _loop_term(view: View, term: Any) -> tuple[int, _TermKey, tuple] | None:
    """(e, key, own) for term = weight_e[:, None] * FFN_e(x), or FFN_e(x * weight_e[:, None]) (weights
    on the input, `_scaled_term`); key holds what must agree across experts, own each matrix's and
    bias's array of its own (None where it is the e-th slice of a stacked one).

    term [..T, D] may have unit token dims that weight_e [..T] and FFN_e(x) [..T, D] lack or hold
    elsewhere (`_same_rows`)."""
    if len(_shape(term)) < 2:
        return None
    if view.op(term) != "mul":
        return _scaled_term(view, term)
    for wexp, cur in (view.args(term), view.args(term)[::-1]):
        we, dims = idioms.unexpand(view, wexp)
        if not _same_rows(term, we, dims, tokens_only=True):
            continue
        sel = loop_expert_weight(view, we)
        if sel is None:
            continue
        e, w, ids = sel
        out = _expert_output(view, term, cur)
        got = None if out is None else _expert_ffn(view, out, e)
        if got is None:
            continue
        projs, act, act_params = got
        x = _routed_rows(view, projs[0].lhs, e, ids)
        return e, _term_key(x, projs, act, act_params, w, ids), _owns(projs)
    return None


def _scaled_term(view: View, term: Any) -> tuple[int, _TermKey, tuple] | None:
    """(e, key, own) for term = FFN_e(x * weight_e[:, None]): expert e on the tokens scaled by their
    weight for it (`loop_expert_weight`), the product maybe cast before the projections; key.x is the
    unscaled tokens, key.scale_dtype the product's dtype."""
    out = _expert_output(view, term, term)
    scaled = None if out is None else _scaled_rows(view, out)
    if scaled is None:
        return None
    e, w, ids, x, scale_dtype = scaled
    got = _expert_ffn(view, out, e)
    if got is None or not idioms.distinct_along_last(view, ids):
        return None  # a token choosing e twice would run FFN_e once on the sum of its two weights
    projs, act, act_params = got
    if any(p.bias is not None for p in projs):
        return None  # an expert not chosen runs on zero rows: with a bias FFN_e(0) != 0 joins the sum
    return e, _term_key(x, projs, act, act_params, w, ids, scale_dtype), _owns(projs)


def scaled_loop_term(view: View, term: Any) -> bool:
    """Whether `term` reads as one expert's FFN of the tokens scaled by their weight for it (a term of
    Llama4's loop, see `looped_expert_outputs`)."""
    out = _expert_output(view, term, term)
    return out is not None and _scaled_rows(view, out) is not None


def _scaled_rows(view: View, out: Any) -> tuple[int, Any, Any, Any, Any] | None:
    """(e, w, ids, x, dtype) when the expert FFN giving `out` reads x * weight_e[:, None] (computed in
    dtype, maybe cast after): its down projection's input is an activation of a projection of it
    (biases looked through: `_scaled_term` declines them)."""
    down = _biased_dot(view, out)
    inner = None if down is None else activation_of(view, down[0])
    first = None if inner is None else _biased_dot(view, inner[1])
    if first is None:
        return None
    rows = view.uncast(first[0])  # the product rounded to the dtype the projections compute in
    if view.op(rows) != "mul":
        return None
    for x_side, s_side in (view.args(rows), view.args(rows)[::-1]):
        s, dims = idioms.unexpand(view, s_side)
        sel = loop_expert_weight(view, s)
        if sel is None or _shape(x_side) != _shape(rows) or not _same_rows(rows, s, dims, tokens_only=True):
            continue
        e, w, ids = sel
        return e, w, ids, x_side, rows.aval.dtype
    return None


def _biased_dot(view: View, atom: Any) -> tuple | None:
    """`dot` of atom, or of the matmul a bias is added to (`_expert_projection` reads which)."""
    if view.op(atom) == "add":
        return next((got for a in view.args(atom) if (got := dot(view, a)) is not None), None)
    return dot(view, atom)


def _expert_output(view: View, term: Any, cur: Any) -> Any | None:
    """The expert FFN's result that `cur` (a factor of `term`) expands or casts, or None when its rows
    are not term's."""
    out, out_dims = idioms.unexpand(view, cur)
    out = view.uncast(out)  # the expert's result cast for the combine (`ffn_precision` reads it)
    if len(_shape(out)) < 2 or not _same_rows(term, out, out_dims, tokens_only=False):
        return None
    return out


def _expert_ffn(view: View, out: Any, e: int) -> tuple[tuple[_Projection, ...], str, tuple] | None:
    """(projections (gate, up, down) or (in, down), activation, its params) for out = expert e's FFN of
    some rows [..T, D] (its token dims kept)."""
    down = _expert_projection(view, out, e, contracted="F")
    if down is None:
        return None
    inner = activation_of(view, down.lhs)
    if inner is None:
        return None
    act, gate, up, act_params = inner
    g = _expert_projection(view, gate, e, contracted="D")
    u = None if up is None else _expert_projection(view, up, e, contracted="D")
    if g is None or (up is not None and (u is None or not view.same(u.lhs, g.lhs))):
        return None
    if _shape(g.lhs)[:-1] != _shape(out)[:-1]:
        return None  # the FFN keeps x's token dims: its rows are x's rows
    return ((g, down) if u is None else (g, u, down)), act, act_params


def _term_key(x: Any, projs: tuple, act: str, act_params: tuple, w: Any, ids: Any,
              scale_dtype: Any = None) -> _TermKey:
    return _TermKey(x, tuple(p.weight for p in projs), tuple(p.bias for p in projs), act, act_params, w, ids,
                    scale_dtype)


def _owns(projs: tuple) -> tuple:
    return tuple(p.own for p in projs) + tuple(p.own_bias for p in projs)


def _same_rows(term: Any, part: Any, dims: dict[int, int], tokens_only: bool) -> bool:
    """Whether `part`, expanded into `term` [..T, D] by `dims` (part dim -> term dim), puts its rows
    at term's token positions in the same row-major order: the expansion only adds unit dims.

    `part` is [..T] (tokens_only: a per-token weight) or [..T, D] (an expert's output, D kept last).
    """
    n = len(_shape(term)) - 1  # term's token dims
    width = len(_shape(part)) - (0 if tokens_only else 1)
    if len(dims) != len(_shape(part)) or any(dims[i] >= n for i in range(width)):
        return False
    if not tokens_only and (dims[width] != n or _shape(part)[width] != _shape(term)[n]):
        return False
    return math.prod(_shape(part)[:width]) == math.prod(_shape(term)[:n])


def loop_expert_weight(view: View, atom: Any) -> tuple[int, Any, Any] | None:
    """(e, w, ids) for atom[..t] = sum_j [ids[..t, j] == e] * w[..t, j].

    Spelled `sum(where(ids == e, w, 0), -1)`, `sum(w * (ids == e), -1)` (ids [..T, k], any number of
    token dims), the same sum over the k dim of a transposed layout (`sum(one_hot(ids).T[e] * w.T, 0)`,
    HF PhiMoE), the same sum written out over the k columns (`where(ids[:, 0] == e, w[:, 0], 0) +
    where(ids[:, 1] == e, w[:, 1], 0)`, `idioms.column_sum`), or a contraction of w [..T, k] with
    expert e's column of `one_hot(ids, E)` over k, batched over the token dims
    (`einsum('kt,tk->t', one_hot(ids).T[e], w)`, HF Qwen2-MoE; `einsum('sk,sk->s', ids == e, w)`, also
    under `vmap`, which adds a batched token dim).
    The multiplying spellings differ from the fused op only for an infinite weight (inf * 0 is NaN).
    """
    atom = view.uncast(atom)  # jnp.sum of bf16 values: summed in f32 and cast back (one nonzero term)
    if view.op(atom) == "reduce_sum" and len(view.params(atom)["axes"]) == 1:
        (axis,) = view.params(atom)["axes"]
        got = _selected_weight(view, view.uncast(view.args(atom)[0]), lambda m: _onehot_column(view, m))
        if got is None:
            return None
        (ids, e, labels), w_side = got
        w = _in_ids_layout(view, w_side, labels) if labels.index("K") == axis else None
        return (e, w, ids) if w is not None and _shape(w) == _shape(ids) else None
    summed = idioms.column_sum(view, atom)
    if summed is not None:
        got = _selected_weight(view, summed.term, lambda m: _equals_expert(view, m))
        if got is None:
            return None
        (ids_0, e), w_0 = got
        w, ids = summed.arrays.get(w_0), summed.arrays.get(ids_0)
        return (e, w, ids) if w is not None and ids is not None and _shape(w) == _shape(ids) else None
    got = dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for m, w, mc, wc, mb, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        col = _onehot_column(view, m)
        if col is None or _shape(col[0]) != _shape(w):
            continue
        ids, e, labels = col
        nt = len(labels) - 1
        tokens = tuple(i for i, lab in enumerate(labels) if lab == "T")
        if (wc, wb) == ((nt,), tuple(range(nt))) and (mc, mb) == ((labels.index("K"),), tokens):
            return e, view.canon(w), ids
    return None


def _in_ids_layout(view: View, atom: Any, labels: tuple[str, ...]) -> Any | None:
    """w [..T, K] (the ids' layout) if atom, whose dims are labelled `labels` (token dims "T" in order,
    one "K"), is w itself or a transpose of it (`w.T` beside `one_hot(ids).T[e]`); else None."""
    base, perm = through_transpose(view, atom)
    ids_dims = iter(range(len(labels) - 1))
    want = tuple(len(labels) - 1 if lab == "K" else next(ids_dims) for lab in labels)
    return base if perm == want else None


def _selected_weight(view: View, atom: Any, mask: Any) -> tuple[Any, Any] | None:
    """(mask(m), w) for atom = `where(m, w, 0)` or `w * m` (m cast to w's dtype), where mask(m) is not
    None (what it reads from m = `ids == e`)."""
    if view.op(atom) == "select_n":
        pred, on_false, on_true = view.args(atom)
        got = mask(pred) if view.scalar(on_false) == 0.0 else None
        return None if got is None else (got, view.canon(on_true))
    if view.op(atom) == "mul":
        for m, w in (view.args(atom), view.args(atom)[::-1]):
            got = mask(m)
            if got is not None:
                return got, view.canon(w)
    return None


def _equals_expert(view: View, atom: Any) -> tuple[Any, int] | None:
    """(ids, e) if atom is `ids == e` (any cast) for integer ids and an integer literal e."""
    atom = view.canon(atom)
    if view.op(atom) == "convert_element_type":
        atom = view.args(atom)[0]
    got = scalar_operand(view, atom) if view.op(atom) == "eq" else None
    if got is None or not jnp.issubdtype(got[0].aval.dtype, jnp.integer) or not float(got[1]).is_integer():
        return None
    return view.canon(got[0]), int(got[1])


def _onehot_column(view: View, atom: Any) -> tuple[Any, int, tuple[str, ...]] | None:
    """(ids, e, labels) if atom is `ids == e` for ids [..T, K], with its dims labelled "T" and "K".

    Spelled `ids == e` (any cast) or as expert e's slice of a (transposed) `one_hot(ids, E)`.
    """
    eq = _equals_expert(view, atom)
    if eq is not None:
        rank = len(_shape(eq[0]))
        return (*eq, ("T",) * (rank - 1) + ("K",)) if rank >= 2 else None
    atom = view.canon(atom)
    if view.op(atom) == "convert_element_type":
        atom = view.args(atom)[0]
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


@dataclasses.dataclass(frozen=True)
class _Projection:
    """One projection of expert e read from a loop term: lhs . M (+ b). `weight` is (W, labels) and
    `bias` (B, labels) or None, W and B the stacked array (the e-th slice read) or an `_Own` key;
    `own` and `own_bias` the arrays of the expert's own (None for a stacked slice or no bias)."""

    lhs: Any
    weight: tuple[Any, tuple[str, ...]]
    own: Any
    bias: tuple[Any, tuple[str, ...]] | None = None
    own_bias: Any = None


def _expert_projection(view: View, atom: Any, e: int, contracted: str) -> _Projection | None:
    """Expert e's projection `lhs . M + b` (`_expert_dot`), its bias b [n_out] added along the output
    dim when there is one (nn.Dense, nnx.Linear with use_bias): the e-th row of a stacked B [E, n_out]
    or a vector of the expert's own."""
    out_label = "F" if contracted == "D" else "D"
    atom = view.canon(atom)
    if view.op(atom) == "add":
        for inner, b_side in (view.args(atom), view.args(atom)[::-1]):
            b, dims = idioms.unexpand(view, b_side)
            proj = _expert_dot(view, inner, e, contracted)
            if proj is None or _shape(b) != _shape(atom)[-1:] or dims != {0: len(_shape(atom)) - 1}:
                continue
            stacked = _stacked_slice(view, b)
            if stacked is not None and stacked[1] == e:
                return dataclasses.replace(proj, bias=(stacked[0], ("E", out_label)))
            return dataclasses.replace(proj, bias=(_Own(_shape(b), b.aval.dtype), (out_label,)), own_bias=b)
    return _expert_dot(view, atom, e, contracted)


def _expert_dot(view: View, atom: Any, e: int, contracted: str) -> _Projection | None:
    """lhs . M for atom = lhs[..T, n] . M, M [n, m] (a transpose of) expert e's weight: the e-th slice
    of a stacked W [E, .., ..] (own None), or an array of its own (W an `_Own` key of its shape and
    dtype, own the array). The labels name the dim M contracts `contracted`."""
    got = dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    rank = len(_shape(lhs))
    if lb or rb or rank < 2 or tuple(lc) != (rank - 1,) or len(_shape(rhs)) != 2:
        return None
    base, perm = through_transpose(view, rhs)
    labels = ["?", "?"]
    labels[perm[rc[0]]] = contracted  # the weight's dim that the matmul contracts
    labels[1 - perm[rc[0]]] = "F" if contracted == "D" else "D"
    stacked = _stacked_slice(view, base)
    if stacked is not None and stacked[1] == e:
        return _Projection(lhs, (stacked[0], ("E", *labels)), None)
    return _Projection(lhs, (_Own(_shape(base), base.aval.dtype), tuple(labels)), base)


def _stacked_slice(view: View, atom: Any) -> tuple[Any, int] | None:
    """(W, i) if atom is W[i] for a stacked W [E, ...] (a unit slice of dim 0, squeezed)."""
    sq = view.producer(atom)
    if sq is None or sq.primitive.name != "squeeze" or tuple(sq.params["dimensions"]) != (0,):
        return None
    sl = view.producer(sq.invars[0])
    if sl is None or sl.primitive.name != "slice" or any(st != 1 for st in sl.params.get("strides") or ()):
        return None
    stacked = view.canon(sl.invars[0])
    starts, limits = sl.params["start_indices"], sl.params["limit_indices"]
    if limits[0] != starts[0] + 1:
        return None
    if any(starts[d] != 0 or limits[d] != _shape(stacked)[d] for d in range(1, len(starts))):
        return None
    return stacked, int(starts[0])


def _routed_rows(view: View, atom: Any, e: int, ids: Any) -> Any:
    """x if atom [..T, D] is x with the rows of the tokens not routed to expert e zeroed: `x * m[:, None]`
    (m cast to x's dtype) or `where(m[:, None], x, 0)`, m = any(ids == e, -1) for the ids the term's
    weight reads; else atom.

    A routed token's row is x's own (x * 1 and the where are exact), and every other token's weight
    for expert e is 0, so the term is the same on finite values; only a non-finite row of a token not
    routed to e differs (x * 0 is NaN there, and NaN * 0 stays NaN in the program).
    """
    atom = view.canon(atom)
    nt = len(_shape(atom)) - 1
    if view.op(atom) == "mul":
        pairs = [view.args(atom), view.args(atom)[::-1]]  # (x, mask) either way round
    elif view.op(atom) == "select_n" and view.scalar(view.args(atom)[1]) == 0.0:
        pairs = [(view.args(atom)[2], view.args(atom)[0])]
    else:
        return atom
    for x, m_side in pairs:
        m, dims = _token_flags(view, m_side)
        if _shape(x) != _shape(atom) or len(_shape(m)) != nt or any(dims.get(i) != i for i in range(nt)):
            continue
        if view.op(m) != "reduce_or" or tuple(view.params(m)["axes"]) != (nt,):
            continue  # any(.., -1) over the k slots of each token
        col = _onehot_column(view, view.args(m)[0])
        if col is not None and col[1] == e and view.same(col[0], ids) and col[2] == ("T",) * nt + ("K",):
            return view.canon(x)
    return atom


def _token_flags(view: View, atom: Any) -> tuple[Any, dict[int, int]]:
    """(m, dims) for atom = m broadcast by dims, looking through a cast of a bool m to numbers."""
    m, dims = idioms.unexpand(view, atom)
    if view.op(m) == "convert_element_type" and view.args(m)[0].aval.dtype == jnp.bool_:
        inner, inner_dims = idioms.unexpand(view, view.args(m)[0])
        return inner, {i: dims[d] for i, d in inner_dims.items() if d in dims}
    return m, dims


def slot_column(view: View, atom: Any, whole: bool = False) -> tuple[Any, int] | None:
    """(a, j) if atom [T] is column j of a 2-D array a [T, K] (`a[:, j]`), looking through broadcasts;
    the column may keep its unit dim (`a[:, j:j + 1]`, broadcast along the features by a product).
    With `whole`, a [T, 1] array is its own column 0 (a top-1 block's `w * y`; not by default, where a
    [T, 1] factor is just as likely a shared expert's gate)."""
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
        column = view.canon(sq.invars[0])
    elif len(_shape(atom)) == 2 and _shape(atom)[1] == 1:
        column = atom
    else:
        return None
    if whole and _shape(column)[1] == 1 and view.op(column) != "slice":
        return column, 0  # the one column of a [T, 1] array (top-1)
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
    return _unrolled_sum(view, y, _slot_term, lambda stacks, terms, ids: _shape(ids)[1])


def _slot_term(view: View, term: Any) -> tuple[int, _TermKey, tuple] | None:
    """(j, key, own) for term = w[:, j, None] * FFN(x; W[ids[:, j]]); key must agree across slots (own:
    no matrix is the slot's own, and no bias is read)."""
    if view.op(term) != "mul" or len(_shape(term)) != 2:
        return None
    for wexp, cur in (view.args(term), view.args(term)[::-1]):
        col = slot_column(view, wexp, whole=True)
        down = _slot_matvec(view, view.uncast(cur))
        if col is None or down is None:
            continue
        h, wd, ids_j, wd_dims = down
        ids_col = slot_column(view, ids_j, whole=True)
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
        key = _TermKey(view.canon(g[0]), stacks, (None,) * len(stacks), act, act_params, col[0], ids_col[0])
        return col[1], key, (None,) * (2 * len(stacks))
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
