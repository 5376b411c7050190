"""Expert-FFN recognition: which values are `act(x @ W_gate[e]) * (x @ W_up[e]) @ W_down[e]`.

The dispatch families differ only in how the expert dim is bound: every expert on every token
(`dense_expert_outputs`), weights gathered by ids (`gathered_expert_outputs`), rows sorted by
expert into ragged groups (`sorted_expert_outputs`, `sorted_scatter_combine`); Python loops are in
`expert_loops`. Matmuls are read as labelled einsums (`dots`), activations by `activations`::

    ffn = dense_expert_outputs(view, o, num_experts)   # o holds FFN_e(x[t]) for every (t, e)
    ffn.x, ffn.w_gate, ffn.w_up, ffn.w_down, ffn.activation, ffn.labels   # labels e.g. ("T0","E","D")
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple

from moefuse import idioms
from moefuse.patterns.activations import activation_of
from moefuse.patterns.dots import (
    Bias,
    Cols,
    bias_labels,
    column_slice,
    cut_bias,
    dot,
    dot_labels,
    down_labels,
    strip_bias,
    through_transpose,
    token_labels,
)
from moefuse.view import View


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


class RowScale(NamedTuple):
    """Router weights that scale each routed row before the first projection (Llama4), taken in `dtype`:
    weights [..T, k] (sorted or gathered rows; any array of T * k entries in row-major (t, j) order), or
    the [..T, E] matrix of each token's weight per expert (dense: every expert on every scaled token)."""

    weights: Any
    dtype: Any


@dataclasses.dataclass(frozen=True)
class PerExpertWeights:
    """One expert matrix kept as E separate arrays: expert e's is arrays[e], without an expert dim
    (a model that keeps each expert as its own module). Its labels (`ExpertFfn.w_*_dims`) are those of
    each array; all of them agree in shape, dtype and layout."""

    arrays: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class ExpertFfn:
    x: Any  # tokens [T, D]
    w_gate: Any  # [E, D, F]-like stacked weight (its own dim order, see w_*_dims), or PerExpertWeights
    w_up: Any | None  # None for a plain (non-gated) MLP
    w_down: Any
    activation: str  # "swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "relu", "silu"
    labels: tuple[str, ...]  # labels of the expert-output value
    w_gate_dims: tuple[str, ...]
    w_up_dims: tuple[str, ...] | None
    w_down_dims: tuple[str, ...]
    gate_cols: Cols | None = None  # columns of w_gate's F dim it uses (halves of a fused gate_up weight)
    up_cols: Cols | None = None
    biases: tuple[Bias | None, ...] = (None, None, None)
    """Biases added after the gate, up and down projections, or None each."""
    act_params: tuple[tuple[str, float], ...] = ()  # e.g. (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0))
    row_scale: RowScale | None = None  # the tokens are scaled by router weights before the experts


def dense_expert_outputs(view: View, out: Any, num_experts: int) -> ExpertFfn | None:
    """Recognise `out` as the down projection of every expert on every token (+ biases)."""
    base, perm = through_transpose(view, out)
    if view.op(base) == "convert_element_type":  # outputs upcast before the combine
        base, perm2 = through_transpose(view, view.args(base)[0])
        perm = tuple(perm2[p] for p in perm)
    base, b_down, b_down_map = strip_bias(view, base)
    if b_down is not None:
        base, perm3 = through_transpose(view, base)
        b_down_map = {i: perm3[d] for i, d in b_down_map.items()}
        perm = tuple(perm3[p] for p in perm)
    got = dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for act_side, w_side, ac, wc, ab, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        if len(_shape(w_side)) != 3 or len(wb) != 1 or len(wc) != 1 or _shape(w_side)[wb[0]] != num_experts:
            continue
        inner = activation_of(view, act_side)
        if inner is None:
            continue
        act, gate, up, act_params = inner
        g = _up_projection(view, gate, num_experts)
        if g is None:
            continue
        g_labels = g.labels
        u = None if up is None else _up_projection(view, up, num_experts)
        if up is not None and (u is None or u.x is not g.x or u.labels != g_labels):
            continue
        if up is not None and (g.scale is None) != (u.scale is None):
            continue
        if u is not None and g.scale is not None and not view.same(u.scale.weights, g.scale.weights):
            continue  # gate and up read the same scaled tokens
        if g.bias is False or (u is not None and u.bias is False):
            continue
        if (g.cols is None) != (u is None or u.cols is None):
            continue  # both halves of one fused weight, or two separate weights
        # the activation's E and F dims must be the ones the down projection batches / contracts
        if len(ab) != 1 or len(ac) != 1 or g_labels[ab[0]] != "E" or g_labels[ac[0]] != "F":
            continue
        wd_dims = ["?"] * 3
        wd_dims[wb[0]], wd_dims[wc[0]] = "E", "F"
        wd_dims[next(i for i in range(3) if i not in (wb[0], wc[0]))] = "D"
        if w_side is lhs:
            labels = dot_labels(tuple(wd_dims), g_labels, wc, ac, wb, ab)
        else:
            labels = dot_labels(g_labels, tuple(wd_dims), ac, wc, ab, wb)
        down_bias = bias_labels(b_down, b_down_map, labels, {"E", "D"})
        if down_bias is False:
            continue
        labels = tuple(labels[p] for p in perm)
        return ExpertFfn(
            x=g.x,
            w_gate=g.w,
            w_up=None if u is None else u.w,
            w_down=w_side,
            activation=act,
            labels=labels,
            w_gate_dims=g.w_dims,
            w_up_dims=None if u is None else u.w_dims,
            w_down_dims=tuple(wd_dims),
            gate_cols=g.cols,
            up_cols=None if u is None else u.cols,
            biases=(g.bias, None if u is None else u.bias, down_bias),
            act_params=act_params,
            row_scale=g.scale,
        )
    return None


class _Up(NamedTuple):
    x: Any  # the tokens [..T, D]
    w: Any
    labels: tuple[str, ...]  # of the projection's value
    w_dims: tuple[str, ...]
    cols: Cols | None  # the F columns it keeps (a half of a fused gate/up weight), or None
    bias: Bias | None | bool  # False: an addend that is not a per-expert bias
    scale: RowScale | None  # the tokens scaled per expert before the projection ([..T, E] weights)


def _up_projection(view: View, atom: Any, num_experts: int) -> _Up | None:
    """atom = x . W[E, D, F] (every expert on every token), or (x * S[..T, E]) . W batched over the
    experts: each expert on the tokens scaled by its column of S.

    A slice along F of such a product (gate and up halves of a fused [E, D, 2F] weight) is
    returned with the column range it keeps; a per-expert bias `+ b[E, F]` with its labels.
    """
    inner, bias, bias_map = strip_bias(view, atom)
    if bias is not None:
        got = _up_projection(view, inner, num_experts)
        if got is None or got.bias is not None:
            return None
        return got._replace(bias=bias_labels(bias, bias_map, got.labels, {"E", "F"}))
    cut = column_slice(view, atom)
    if cut is not None:
        inner_atom, axis, cols = cut
        inner = _up_projection(view, inner_atom, num_experts)
        if inner is None or inner.cols is not None or inner.labels[axis] != "F":
            return None
        return inner._replace(cols=cols, bias=cut_bias(inner.bias, cols))
    base, perm = through_transpose(view, atom)
    got = dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    if len(lb) == 1 and len(rb) == 1 and len(lc) == 1:
        return _scaled_projection(view, got, perm, num_experts)
    if lb or rb or len(lc) != 1:
        return None
    for x_side, w_side, xc, wc in ((lhs, rhs, lc, rc), (rhs, lhs, rc, lc)):
        if len(_shape(x_side)) < 2 or len(_shape(w_side)) != 3:
            continue
        free = [i for i in range(3) if i != wc[0]]
        e_dims = [i for i in free if _shape(w_side)[i] == num_experts]
        if not e_dims:
            continue
        e_dim = e_dims[0]
        f_dim = next(i for i in free if i != e_dim)
        w_labels = ["?"] * 3
        w_labels[e_dim], w_labels[f_dim], w_labels[wc[0]] = "E", "F", "D"
        if xc[0] != len(_shape(x_side)) - 1:
            continue  # tokens must be [..T, D]
        x_labels = [*token_labels(len(_shape(x_side)) - 1), "D"]
        if x_side is lhs:
            labels = dot_labels(tuple(x_labels), tuple(w_labels), xc, wc, (), ())
        else:
            labels = dot_labels(tuple(w_labels), tuple(x_labels), wc, xc, (), ())
        labels = tuple(labels[p] for p in perm)
        return _Up(x_side, w_side, labels, tuple(w_labels), None, None, None)
    return None


def _scaled_projection(view: View, got: tuple, perm: tuple[int, ...], num_experts: int) -> _Up | None:
    """The dot `got` batched over the experts as (x * S[..T, E]) . W[E, D, F] (see `_up_projection`)."""
    lhs, rhs, lc, rc, lb, rb = got
    for x_side, w_side, xc, wc, xb, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        if len(_shape(w_side)) != 3 or _shape(w_side)[wb[0]] != num_experts or wc[0] == wb[0]:
            continue
        toks = [d for d in range(len(_shape(x_side))) if d not in (xb[0], xc[0])]
        scaled = _scaled_tokens(view, x_side, toks, xc[0], xb[0])
        if scaled is None:
            continue
        x, s = scaled
        w_labels = ["F"] * 3
        w_labels[wb[0]], w_labels[wc[0]] = "E", "D"
        x_labels = ["E"] * len(_shape(x_side))
        x_labels[xc[0]] = "D"
        for i, d in enumerate(toks):
            x_labels[d] = f"T{i}"
        if x_side is lhs:
            labels = dot_labels(tuple(x_labels), tuple(w_labels), xc, wc, xb, wb)
        else:
            labels = dot_labels(tuple(w_labels), tuple(x_labels), wc, xc, wb, xb)
        labels = tuple(labels[p] for p in perm)
        return _Up(x, w_side, labels, tuple(w_labels), None, None, RowScale(s, x_side.aval.dtype))
    return None


def _scaled_tokens(view: View, atom: Any, toks: list[int], d_dim: int, w_dim: int) -> tuple[Any, Any] | None:
    """(x, w) if atom = x * w with x [..T, D] and w [..T, n] broadcast into atom's dims: x's token dims
    at `toks` (in order) and its D at d_dim, w's token dims at `toks` and its last dim at w_dim (w maybe
    transposed first, as `S.T[:, :, None]`). Each token's row times its weight for each of n slots or
    experts."""
    if view.op(atom) != "mul":
        return _outer_scaled(view, atom, toks, d_dim, w_dim)
    nt = len(toks)
    for a, b in itertools.permutations(view.args(atom)):
        x, x_dims = idioms.unexpand(view, a)
        if len(_shape(x)) != nt + 1 or [x_dims.get(i) for i in range(nt + 1)] != [*toks, d_dim]:
            continue
        base, w_dims = idioms.unexpand(view, b)
        w, perm = through_transpose(view, base)  # base dim i is w's dim perm[i]
        if len(_shape(w)) != nt + 1:
            continue
        if [w_dims.get(perm.index(j)) for j in range(nt + 1)] == [*toks, w_dim]:
            return x, w
    return None


def _outer_scaled(view: View, atom: Any, toks: list[int], d_dim: int, w_dim: int) -> tuple[Any, Any] | None:
    """`_scaled_tokens`'s (x, w) for the same product spelled as an einsum without a contraction
    (`einsum('te,td->etd', w, x)`: a dot_general batching the token dims), maybe transposed after."""
    base, perm = through_transpose(view, atom)
    got = dot(view, base)
    if got is None or got[2] or got[3]:
        return None
    lhs, rhs, _, _, lb, rb = got
    nt = len(toks)
    for w, x, wb, xb in ((lhs, rhs, lb, rb), (rhs, lhs, rb, lb)):
        if len(_shape(w)) != nt + 1 or len(_shape(x)) != nt + 1 or wb != tuple(range(nt)) or xb != wb:
            continue
        w_base, d_base = (nt, nt + 1) if w is lhs else (nt + 1, nt)  # batch dims, then lhs's, then rhs's
        if [perm[t] for t in toks] == list(range(nt)) and (perm[d_dim], perm[w_dim]) == (d_base, w_base):
            return x, w
    return None


def gathered_expert_outputs(view: View, out: Any) -> tuple[ExpertFfn, Any] | None:
    """(ffn, ids) if out[..t, j] = FFN_{ids[..t, j]}(x[..t]) with weights gathered by ids (`w[ids]`),
    or FFN_{ids[..t, j]}(x[..t] * w[..t, j]) on the tokens scaled by the router weights of the same
    choice (`ffn.row_scale`: `einsum('tkd,tkdf->tkf', x[:, None] * w[..., None], W[ids])`).

    Token dims may be several ([B, S, D] tokens with [B, S, K] ids): labelled "T0", "T1", ...
    Biases gathered the same way (`b[ids]`) and gate/up halves of one fused weight are understood.
    With the layout flattened to (token, slot) pairs (weights gathered by `ids.reshape(-1)`, tokens
    `x[arange(T * k) // k]`, see `_gathered_pairs`), out is [T * k, D], labelled ("P", "D").
    """
    base, perm = through_transpose(view, out)
    down = _gathered(view, base, up=False)
    if down is None or down.cols is not None:
        return None
    inner = activation_of(view, down.act)
    if inner is None:
        return None
    act, gate, up, act_params = inner
    g = _gathered(view, gate, up=True)
    u = None if up is None else _gathered(view, up, up=True)
    if g is None or (up is not None and (u is None or not view.same(u.act, g.act))):
        return None
    parts = [g, down] if u is None else [g, u, down]
    for p in parts:  # every weight and bias gathered with the same ids
        if not view.same(p.ids, down.ids) or (p.bias is not None and not view.same(p.bias_rows, down.ids)):
            return None
    if u is not None and (g.cols is None) != (u.cols is None):
        return None
    if u is not None and (g.scale is None) != (u.scale is None):
        return None
    if any(p.pairs != down.pairs for p in parts):
        return None
    if down.pairs:  # out [T * k, D], one row per (token, slot) pair; the ids [T, k]
        ids = view.reshaped_from(down.ids)
        if perm != (0, 1) or ids is None or _shape(ids)[0] != _shape(g.act)[0]:
            return None
        return _ffn_of_parts(g.act, g, u, down, act, act_params, ("P", "D"), None), ids
    if g.scale is not None and (
        (u is not None and not view.same(u.scale.weights, g.scale.weights))
        or not idioms.from_choice(view, g.scale.weights, down.ids)
    ):
        return None  # gate and up read the same rows, scaled by the weights of the router's choice
    o_labels = (*token_labels(len(_shape(down.ids)) - 1), "K", "D")
    labels = tuple(o_labels[p] for p in perm)
    return _ffn_of_parts(g.act, g, u, down, act, act_params, labels, g.scale), down.ids


def _ffn_of_parts(
    x: Any, g: Any, u: Any, down: Any, act: str, act_params: tuple, labels: tuple, scale: RowScale | None
) -> ExpertFfn:
    """The ExpertFfn of recognised gate / up (or None) / down projections (`_Gathered` or `_Ragged`:
    each with w, dims, cols and bias, labelled as an up projection)."""
    d_bias = down.bias and down.bias._replace(labels=down_labels(down.bias.labels))
    return ExpertFfn(
        x=x,
        w_gate=g.w,
        w_up=None if u is None else u.w,
        w_down=down.w,
        activation=act,
        labels=labels,
        w_gate_dims=g.dims,
        w_up_dims=None if u is None else u.dims,
        w_down_dims=down_labels(down.dims),
        gate_cols=g.cols,
        up_cols=None if u is None else u.cols,
        biases=(g.bias, None if u is None else u.bias, d_bias),
        act_params=act_params,
        row_scale=scale,
    )


class _Gathered(NamedTuple):
    act: Any  # x [..T, D] (up projections) or the hidden h [..T, K, F] (down)
    w: Any
    ids: Any
    dims: tuple[str, ...]  # W's labels; the contracted dim is "D", the output dim "F" (relabelled for down)
    cols: Cols | None
    bias: Bias | None
    bias_rows: Any  # the ids the bias was gathered with, or None
    scale: RowScale | None = None  # up projections of the tokens scaled per slot: x is then unscaled
    pairs: bool = False  # the [T, k] layout flattened: rows are (token, slot) pairs, ids [T * k]


def _gathered(view: View, atom: Any, up: bool) -> _Gathered | None:
    """atom = act . W[ids] per token and slot, maybe cut to some columns, maybe + b[ids].

    `einsum('td,tkdf->tkf')` for up projections (or `einsum('tkd,tkdf->tkf')` of the tokens scaled
    per slot, `x[:, None] * w[..., None]`), `einsum('tkf,tkfd->tkd')` for the down projection, either
    operand order: all give [..T, K, out] (batch dims first, then the one free dim).
    """
    atom = view.canon(atom)
    if view.op(atom) == "add":
        for inner, b in (view.args(atom), view.args(atom)[::-1]):
            taken = idioms.take(view, b)
            if taken is None or len(_shape(taken[0])) != 2:
                continue
            got = _gathered(view, inner, up)
            if got is None or got.bias is not None:
                return None
            return got._replace(bias=Bias(taken[0], ("E", "F"), None), bias_rows=taken[1])
        return None
    cut = column_slice(view, atom)
    if cut is not None:
        inner_atom, axis, cols = cut
        inner = _gathered(view, inner_atom, up)
        if inner is None or inner.cols is not None or axis != len(_shape(atom)) - 1:
            return None
        return inner._replace(cols=cols, bias=cut_bias(inner.bias, cols))
    got = dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for a_side, g_side, ac, gc, ab, gb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        taken = idioms.take(view, g_side)
        if taken is None or len(_shape(taken[0])) != 3:
            continue
        w, ids = taken
        if len(_shape(ids)) == 1:  # W[ids.reshape(-1)]: one row per (token, slot) pair
            pairs = _gathered_pairs(view, a_side, w, ids, (ac, gc, ab, gb), up)
            if pairs is not None:
                return pairs
            continue
        nt = len(_shape(ids)) - 1  # token dims; then the k dim
        per_slot = not up or len(gb) == nt + 1  # the tokens scaled per slot: [..T, K, D]
        batch = tuple(range(nt + 1 if per_slot else nt))
        if nt < 1 or tuple(gb) != batch or tuple(ab) != batch or len(gc) != 1 or gc[0] - nt not in (1, 2):
            continue
        if len(_shape(a_side)) != len(batch) + 1 or tuple(ac) != (len(batch),):
            continue
        dims = ("E", "D", "F") if gc[0] - nt == 1 else ("E", "F", "D")
        if up and per_slot:
            scaled = _scaled_tokens(view, a_side, list(range(nt)), nt + 1, nt)
            if scaled is None or _shape(scaled[1]) != _shape(ids):
                continue
            scale = RowScale(scaled[1], a_side.aval.dtype)
            return _Gathered(scaled[0], w, ids, dims, None, None, None, scale)
        return _Gathered(a_side, w, ids, dims, None, None, None)
    return None


def _gathered_pairs(view: View, a_side: Any, w: Any, flat: Any, dn: tuple, up: bool) -> _Gathered | None:
    """`einsum('nd,ndf->nf', rows, W[flat])` over the (token, slot) pairs of a [T, k] layout flattened
    row-major: flat = ids.reshape(-1), and for an up projection rows = x[i // k] (`x[arange(T * k) // k]`,
    `x[repeat(arange(T), k)]` or `repeat(x, k)`), read as x itself; a down projection reads the hidden
    rows [T * k, F] as they are."""
    ac, gc, ab, gb = dn
    if tuple(gb) != (0,) or tuple(ab) != (0,) or len(gc) != 1 or gc[0] not in (1, 2) or tuple(ac) != (1,):
        return None
    if len(_shape(a_side)) != 2:
        return None
    dims = ("E", "D", "F") if gc[0] == 1 else ("E", "F", "D")
    if not up:
        return _Gathered(a_side, w, flat, dims, None, None, None, pairs=True)
    rows = view.uncast(a_side)
    taken = idioms.take(view, rows)
    k = None if taken is None else idioms.pair_rows(view, taken[1])
    x, k = (taken[0], k) if k is not None else (idioms.repeated_rows(view, rows) or (None, None))
    ids = view.reshaped_from(flat)
    if x is None or ids is None or len(_shape(x)) != 2 or _shape(ids) != (_shape(x)[0], k):
        return None
    return _Gathered(x, w, flat, dims, None, None, None, pairs=True)


def sorted_expert_outputs(view: View, out: Any) -> tuple[ExpertFfn, Any] | None:
    """(ffn, ids) for out [T, K, D] computed on rows sorted by expert with `lax.ragged_dot`.

    The chain: flat = ids.reshape(-1); perm = argsort(flat); rows = x[perm // K];
    sizes = bincount(flat, E); h = ragged_dot(rows, W, sizes) for gate/up/down; then unpermuted
    by the inverse permutation (gather at argsort(perm), or scatter to perm) and reshaped.
    """
    out = view.canon(out)
    eqn = view.producer(out)
    if eqn is None or eqn.primitive.name != "reshape" or len(_shape(out)) != 3:
        return None
    o_sorted, perm = _unpermuted(view, view.canon(eqn.invars[0]))
    got = None if o_sorted is None else sorted_rows_ffn(view, o_sorted)
    if got is None or not view.same(got[2], perm):
        return None
    if (_tokens_of(_shape(got[1])), _shape(got[1])[-1]) != _shape(out)[:2]:
        return None
    return got[0], got[1]


def sorted_token_outputs(view: View, out: Any) -> tuple[ExpertFfn, Any] | None:
    """(ffn, ids) for out [T, D] = the sorted rows' outputs put back in token order with k = 1: a top-1
    block whose one slot is never summed (labels ("T0", "D"))."""
    o_sorted, perm = _unpermuted(view, view.canon(out))
    got = None if o_sorted is None else sorted_rows_ffn(view, o_sorted)
    if got is None or not view.same(got[2], perm) or len(_shape(out)) != 2:
        return None
    ffn, ids, _ = got
    if _shape(ids)[-1] != 1 or _shape(out)[0] != _tokens_of(_shape(ids)):
        return None
    return dataclasses.replace(ffn, labels=("T0", "D")), ids


def row_scatter_add(view: View, y: Any) -> tuple[Any, Any] | None:
    """(rows, updates) if y = zeros[T, D].at[rows].add(updates) with updates [N, D] a product (each
    update row added to row rows[i]: `.at[rows].add`, `jax.ops.segment_sum`)."""
    eqn = view.producer(y)
    if eqn is None or eqn.primitive.name not in ("scatter-add", "scatter_add") or len(_shape(y)) != 2:
        return None
    operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
    dn = eqn.params["dimension_numbers"]
    if (
        view.scalar(operand) != 0
        or tuple(dn.inserted_window_dims) != (0,)
        or tuple(dn.update_window_dims) != (1,)
    ):
        return None
    if tuple(dn.scatter_dims_to_operand_dims) != (0,) or view.op(updates) != "mul":
        return None
    rows = idioms.index_array(view, indices)
    return None if rows is None else (rows, updates)


def pair_scatter_combine(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, ids, weights) for y = zeros[T, D].at[arange(T * k) // k].add(O * w.reshape(-1)[:, None]) (or
    its `jax.ops.segment_sum`), O the expert outputs of the (token, slot) pairs in row-major order: the
    weighted sum over each token's k slots."""
    got = row_scatter_add(view, y)
    k = None if got is None else idioms.pair_rows(view, got[0])
    if k is None:
        return None
    n = _shape(got[0])[0]
    for o_side, w_side in itertools.permutations(view.args(got[1])):
        outs = gathered_expert_outputs(view, view.uncast(o_side))
        if outs is None or outs[0].labels != ("P", "D") or _shape(outs[1]) != (_shape(y)[0], k):
            continue
        c = _row_factor(view, w_side, n)
        w = None if c is None else view.reshaped_from(c)
        if w is not None and _shape(w) == _shape(outs[1]):
            return outs[0], outs[1], w
    return None


def sorted_scatter_combine(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, ids, weights) for y = zeros[T, D].at[perm // K].add(O_sorted * w.reshape(-1)[perm])."""
    got = row_scatter_add(view, y)
    if got is None:
        return None
    src, updates = got
    if view.op(src) != "div":
        return None
    for o_side, w_side in (view.args(updates), view.args(updates)[::-1]):
        got = sorted_rows_ffn(view, o_side)
        if got is None or not view.same(view.args(src)[0], got[2]):
            continue
        ffn, ids, perm = got
        if view.scalar(view.args(src)[1]) != _shape(ids)[-1]:
            continue
        w_sorted, _ = idioms.unexpand(view, w_side)
        taken = idioms.take(view, w_sorted)
        if taken is None or not view.same(taken[1], perm):
            continue
        w = view.reshaped_from(taken[0])
        if w is None or (_tokens_of(_shape(w)), _shape(w)[-1:]) != (
            _tokens_of(_shape(ids)), _shape(ids)[-1:]
        ):
            continue
        return ffn, ids, w
    return None


def sorted_rows_ffn(view: View, o_sorted: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, ids, perm) if o_sorted[i] = FFN_{flat[perm[i]]}(x[perm[i] // K]), or of those rows scaled
    by the router weights of the same choice (`ffn.row_scale`, see `_row_source`).

    Expert biases may be added per row, gathered with the row's expert `b[flat[perm]]`.
    """
    down = _ragged(view, o_sorted)
    if down is None or down.cols is not None:
        return None
    inner = activation_of(view, down.rows)
    if inner is None:
        return None
    act, gate, up, act_params = inner
    g = _ragged(view, gate)
    u = None if up is None else _ragged(view, up)
    if g is None or (up is not None and u is None):
        return None
    parts = [g, down] if u is None else [g, u, down]
    if any(not view.same(p.sizes, down.sizes) for p in parts):
        return None
    if u is not None and not view.same(u.rows, g.rows):
        return None
    if u is not None and (g.cols is None) != (u.cols is None):
        return None
    source = _row_source(view, g.rows)
    if source is None:
        return None
    x, perm, k_rows, scale = source
    order = idioms.argsort(view, perm)
    counts = idioms.bincount(view, down.sizes)
    if order is None or counts is None or order[1] != 0 or not view.same(order[0], counts[0]):
        return None
    flat = order[0]
    for p in parts:  # a bias must be gathered with each row's expert
        if p.bias is not None and not _row_experts(view, p.bias_rows, flat, perm, down.sizes):
            return None
    ids = view.reshaped_from(flat)  # [..T, k]: several token dims ([B, S, k] ids) flatten in order
    if ids is None or len(_shape(ids)) < 2:
        return None
    if scale is not None and not idioms.from_choice(view, scale.weights, ids):
        # a factor that is not the router's weight (a norm's) is part of the tokens
        plain = _row_source(view, g.rows, scaled=False)
        if plain is None or not view.same(plain.perm, perm):
            return None
        x, _, k_rows, scale = plain
    k = _shape(ids)[-1]
    if k_rows != k or _shape(x)[0] != _tokens_of(_shape(ids)) or counts[1] != _shape(down.w)[0]:
        return None
    return _ffn_of_parts(x, g, u, down, act, act_params, ("T0", "K", "D"), scale), ids, perm


def _row_experts(view: View, rows: Any, flat: Any, perm: Any, sizes: Any) -> bool:
    """Whether rows[i] is sorted row i's expert: flat[perm], or segment i of the group sizes
    (`jnp.repeat(arange(E), sizes, total_repeat_length=N)`; sizes = bincount(flat) cover every row)."""
    if rows is None:
        return False
    taken = idioms.take(view, rows)
    if taken is not None and view.same(taken[0], flat) and view.same(taken[1], perm):
        return True
    segments = idioms.segment_ids(view, rows)
    return segments is not None and view.same(segments, sizes)


class _Rows(NamedTuple):
    x: Any  # the tokens [T, D]
    perm: Any  # sorted row i is the flat assignment perm[i]
    k: float | None
    scale: RowScale | None  # each row times its assignment's weight, or None


def _row_source(view: View, rows: Any, scaled: bool = True) -> _Rows | None:
    """rows [T * k, D] == x[perm // k] (spelled so, `jnp.repeat(x, k)[perm]`, or `x[perm]` with k = 1).

    With `scaled`, also those rows each times its assignment's weight, w.reshape(-1)[perm], before the
    sort (`(jnp.repeat(x, k) * w.reshape(-1)[:, None])[perm]`) or after it (`x[perm // k] *
    w.reshape(-1)[perm][:, None]`); the caller checks that w is the router's (`idioms.from_choice`).
    """
    rows = view.uncast(rows)  # rows cast to the projections' dtype
    prod = rows
    if scaled and view.op(prod) == "mul":
        for r, s in itertools.permutations(view.args(prod)):
            got = _row_source(view, r, scaled=False)
            c = _row_factor(view, s, _shape(prod)[0])
            taken = None if got is None or c is None else idioms.take(view, c)
            if taken is not None and view.same(taken[1], got.perm):
                return got._replace(scale=RowScale(_unflattened(view, taken[0]), prod.aval.dtype))
        return None
    taken = idioms.take(view, rows)
    if taken is None:
        return None
    src, idx = taken
    repeated = idioms.repeated_rows(view, src)
    if repeated is not None:
        return _Rows(repeated[0], idx, repeated[1], None)
    if len(_shape(src)) != 2:
        return None
    if view.op(idx) == "div":
        perm, k = view.args(idx)
        return _Rows(src, perm, view.scalar(k), None)
    prod = view.uncast(src)
    if scaled and view.op(prod) == "mul":
        for r, s in itertools.permutations(view.args(prod)):
            repeated = idioms.repeated_rows(view, view.uncast(r))  # tokens repeated, then promoted
            x, k = repeated if repeated is not None else (r, 1)
            c = _row_factor(view, s, _shape(prod)[0])
            if c is not None and len(_shape(x)) == 2:
                return _Rows(x, idx, k, RowScale(_unflattened(view, c), prod.aval.dtype))
    return _Rows(src, idx, 1, None)  # x[perm] is x[perm // 1]


def _row_factor(view: View, atom: Any, n: int) -> Any | None:
    """c if atom [n, ...] is c (n entries, maybe with unit dims) broadcast along all but its first dim:
    one factor per row."""
    base, dims = idioms.unexpand(view, atom)
    if not _shape(atom) or _shape(atom)[0] != n or math.prod(_shape(base)) != n:
        return None
    if any(dims.get(b) != 0 for b, size in enumerate(_shape(base)) if size != 1):
        return None
    return base


def _unflattened(view: View, c: Any) -> Any:
    """The array whose row-major flattening c is (the operand of `w.reshape(-1)`), else c."""
    w = view.reshaped_from(c)
    return view.canon(c) if w is None else w


def _tokens_of(shape: tuple[int, ...]) -> int:
    """The number of tokens of ids (or weights) [..T, k]; -1 for fewer than two dims."""
    return math.prod(shape[:-1]) if len(shape) >= 2 else -1


def _unpermuted(view: View, flat: Any) -> tuple[Any, Any] | tuple[None, None]:
    """(sorted_values, perm) if flat[j] = sorted_values[inverse(perm)[j]]."""
    taken = idioms.take(view, flat)
    if taken is not None:
        vals, inv = taken
        perm = idioms.inverse_permutation(view, inv)
        if perm is not None:
            return vals, perm
    eqn = view.producer(flat)
    if eqn is not None and eqn.primitive.name == "scatter":
        operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
        dn = eqn.params["dimension_numbers"]
        perm = idioms.index_array(view, indices)
        if (
            perm is not None
            and view.scalar(operand) == 0
            and tuple(dn.inserted_window_dims) == (0,)
            and idioms.argsort(view, perm)
        ):
            return updates, perm
    return None, None


class _Ragged(NamedTuple):
    rows: Any
    w: Any
    sizes: Any
    dims: tuple[str, ...]  # W's labels; the output column dim is "F" (the caller relabels for down)
    cols: Cols | None
    bias: Bias | None
    bias_rows: Any  # the per-row expert index the bias was gathered with, or None


def _ragged(view: View, atom: Any) -> _Ragged | None:
    """atom = ragged_dot(rows, W, sizes), maybe cut to some columns, maybe + b[expert_of_row]."""
    atom = view.uncast(atom)  # preferred_element_type, or a cast back
    if view.op(atom) == "add":
        for inner, b in (view.args(atom), view.args(atom)[::-1]):
            taken = idioms.take(view, b)
            if taken is None or len(_shape(taken[0])) != 2 or len(_shape(taken[1])) != 1:
                continue
            got = _ragged(view, inner)
            if got is None or got.bias is not None:
                return None
            return got._replace(bias=Bias(taken[0], ("E", "F"), None), bias_rows=taken[1])
        return None
    cut = column_slice(view, atom)
    if cut is not None:
        inner_atom, axis, cols = cut
        if axis == 0:
            return _unpadded(view, inner_atom, cols)
        inner = _ragged(view, inner_atom)
        if inner is None or inner.cols is not None or axis != 1:
            return None
        return inner._replace(cols=cols, bias=cut_bias(inner.bias, cols))
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "ragged_dot_general":
        return None
    rdn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    if lb or rb or tuple(rdn.lhs_ragged_dimensions) != (0,) or tuple(rdn.rhs_group_dimensions) != (0,):
        return None
    if tuple(lc) != (1,) or len(rc) != 1 or rc[0] not in (1, 2):
        return None
    rows, w, sizes = (view.canon(v) for v in eqn.invars)
    dims = ("E", "D", "F") if rc[0] == 1 else ("E", "F", "D")
    base, perm = through_transpose(view, w)  # torch-layout weights swapped for ragged_dot
    if perm[0] == 0:
        w, dims = base, tuple(dims[perm.index(d)] for d in range(3))
    return _Ragged(rows, w, sizes, dims, None, None, None)


def _unpadded(view: View, atom: Any, rows: Cols) -> _Ragged | None:
    """ragged_dot(pad(r), W, sizes)[:len(r)] is ragged_dot(r, W, sizes): each output row is its own
    row times its group's weight, and rows appended at the end do not move any group (MaxText pads
    the sorted rows to a tile multiple and slices the padding off)."""
    inner = _ragged(view, atom)
    if inner is None or inner.cols is not None or inner.bias is not None:
        return None
    pad = view.producer(inner.rows)
    if pad is None or pad.primitive.name != "pad":
        return None
    config = [tuple(c) for c in pad.params["padding_config"]]
    base = view.canon(pad.invars[0])
    if config[0][0] != 0 or config[0][2] != 0 or any(c != (0, 0, 0) for c in config[1:]):
        return None
    return inner._replace(rows=base) if rows == (0, _shape(base)[0], 1) else None


def is_ragged_dot(view: View, atom: Any) -> bool:
    """Whether atom is (a bias-added, column-cut) `lax.ragged_dot` product."""
    return _ragged(view, atom) is not None
