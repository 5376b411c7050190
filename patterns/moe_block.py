"""Whole-MoE pattern: every expert's FFN combined by the router's weights, fused into `moe`.

Anchors on the combine (a weighted sum over experts or over the k slots, a scatter-add of sorted
rows, or the last add of an unrolled loop) and recognises what feeds it with `experts.py` (the dense
spelling: all experts on all tokens, then a [..T, E] combine matrix; the per-token weight gather;
sorted `lax.ragged_dot`) and `expert_loops.py` (the Python loops over experts or over slots), both
reading matmuls as labelled einsums (`dots.py`) and activations by `activations.py`; a shared expert added to
the result joins the op (`shared.py`). Capacity dispatch is `capacity.py`. The fused op does only
the routed work::

    gate = jnp.einsum("td,edf->tef", x, w_gate); up = jnp.einsum("td,edf->tef", x, w_up)
    out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, w_down)
    combine = jnp.sum(jax.nn.one_hot(ids, E) * weights[..., None], axis=1)
    y = jnp.einsum("ted,te->td", out, combine)          # -> moe(x, weights, ids, w_gate, w_up, w_down)

Llama4 scales the tokens by the router weights before the experts and sums their outputs with
weight 1 (a plain `sum`, a contraction with ones, or no sum for a sorted top-1: `moe` with
weights_on_input); the recognisers report such rows as `ExpertFfn.row_scale`, and a block that
also weights the outputs is declined.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from moefuse import idioms
from moefuse.match import NoMatch, Proposal
from moefuse.patterns.activations import kernel_activation
from moefuse.patterns.dots import Bias, Cols, token_labels
from moefuse.patterns.expert_loops import (
    loop_expert_weight,
    looped_expert_outputs,
    scaled_loop_term,
    slot_column,
    slot_loop_outputs,
)
from moefuse.patterns.experts import (
    ExpertFfn,
    PerExpertWeights,
    dense_expert_outputs,
    gathered_expert_outputs,
    is_ragged_dot,
    pair_scatter_combine,
    row_scatter_add,
    sorted_expert_outputs,
    sorted_scatter_combine,
    sorted_token_outputs,
)
from moefuse.patterns.precision import FfnValues, ffn_precision
from moefuse.patterns.shared import with_shared_expert
from moefuse.view import View

OP = "moe"
SUPPORTED = (
    (
        OP,
        "dense experts + combine matrix",
        "`einsum('td,edf->tef')` per projection (any dim order, `[B, S, D]` tokens, fused gate/up split, "
        "biases), `vmap` over experts; combine `[..., E]` by `one_hot(ids) * w` or `where(one_hot, w, 0)` "
        "summed over k, by einsum with the one-hot, by a scatter of w, or by a matrix 0 off the ids: "
        "`where(one_hot(ids).sum(-2) > 0, p, 0)` (renormalised over E for p a softmax / sigmoid), "
        "`softmax(where(mask, logits, -inf))`; the tokens may reach the experts through a dispatch mask "
        "that is 1 at the combine's experts (`einsum('te,td->etd', one_hot(ids[:, 0], E), x)`, combined "
        "by `one_hot(ids[:, 0], E) * w`: dispatch=masked)",
        "num_experts, k, activation",
    ),
    (
        OP,
        "sorted dispatch",
        "argsort of flat ids, `x[perm // k]`, bincount / one_hot-sum / segment_sum group sizes, "
        "`lax.ragged_dot` (separate, split or interleaved gate/up, torch layout via swapaxes, biases "
        "`b[flat[perm]]`), unpermute by inverse-permutation gather or scatter, or a weighted "
        "`.at[perm // k].add` / `segment_sum`",
        "num_experts, k, activation",
    ),
    (
        OP,
        "Python loop over experts",
        "`for e in range(E)`: `w_e[:, None] * ffn(x, w1[e], ...)` or, experts kept as modules, "
        "`ffn(x, experts[e][...])` on arrays of their own (taken as they are, never stacked; `[in, out]` "
        "or torch `.T`; biases `b[e]` or their own, as `nn.Dense` adds them) with "
        "`w_e = sum(where(ids == e, w, 0), -1)`, `sum(w * (ids == e), -1)`, that sum written out over the "
        "k slots (`where(ids[:, 0] == e, w[:, 0], 0) + ...`), `sum(one_hot(ids).transpose(2, 1, 0)[e] * "
        "w.T, 0)` or `einsum('kt,tk->t', one_hot(ids).T[e], w)`; the expert's result may be cast before "
        "its weight, and it may read only its routed tokens (`x * any(ids == e, -1)[:, None]`); also with "
        "`[B, S, D]` tokens, under `vmap` over the batch, or in a `[1, T, D]` layout (ids `[1, T, k]`, "
        "`w_e[:, :, None] * ffn(x)[None]`)",
        "num_experts, k, activation",
    ),
    (
        OP,
        "per-token weight gather",
        "`w[ids]` / `jnp.take` -> `einsum('td,tkdf->tkf')` (also `[B, S, D]` tokens, either operand order, "
        "gathered biases), combine `einsum('tkd,tk->td')` or `sum(y * w[..., None], k)`; or a loop over the "
        "k slots of `matmul(w1[ids[:, j]], x[..., None])`; or the (token, slot) pairs flattened: "
        "`einsum('nd,ndf->nf', x[arange(T*k) // k], w[ids.reshape(-1)])` summed back by "
        "`.at[arange(T*k) // k].add(y * w.reshape(-1)[:, None])` or `segment_sum`",
        "num_experts, k, activation",
    ),
    (
        OP,
        "weights on the input (Llama4)",
        "each token scaled by its router weight before the experts: sorted rows "
        "`(repeat(x, k) * w.reshape(-1)[:, None])[perm]` or `x[perm // k] * w.reshape(-1)[perm][:, None]` "
        "(`x[perm]` for k = 1), gathered `einsum('tkd,tkdf->tkf', x[:, None] * w[..., None], W[ids])`, dense "
        "`x[None] * S.T[..., None]` batched over experts (S the `[T, E]` combine matrix; no expert biases); "
        "the outputs summed with weight 1 (`sum`, a contraction with ones, or none for a sorted top-1)",
        "weights_on_input",
    ),
)


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


class MoePattern:
    op = OP

    def anchors(self, view: View) -> Iterable[int]:
        out = []
        for i, e in enumerate(view.jaxpr.eqns):
            if len(e.outvars) != 1 or len(_shape(e.outvars[0])) < 2:
                continue
            if e.primitive.name in ("scatter-add", "scatter_add"):
                got = row_scatter_add(view, e.outvars[0])
                if got is not None and (
                    any(is_ragged_dot(view, a) for a in view.args(got[1]))
                    or idioms.pair_rows(view, got[0]) is not None
                ):
                    out.append(i)
            elif e.primitive.name == "add" and _is_loop_sum_root(view, e):
                out.append(i)
            elif e.primitive.name == "mul" and _is_single_slot(view, e):
                out.append(i)
            elif _weighted_sum(view, e) is not None:
                out.append(i)
            elif (sm := _plain_sum(view, e)) is not None and _scaled_experts(view, sm) is not None:
                out.append(i)
            elif e.primitive.name in ("gather", "scatter") and _top1_unsummed(view, e) is not None:
                out.append(i)
        return out

    def match(self, view: View, anchor: int) -> Proposal | NoMatch:
        eqn = view.jaxpr.eqns[anchor]
        if eqn.primitive.name in ("scatter-add", "scatter_add"):
            return self._match_scatter(view, anchor)
        if eqn.primitive.name == "mul":  # top-1: the one slot's term is the whole sum
            got = slot_loop_outputs(view, eqn.outvars[0])
            if got is None:
                return NoMatch(anchor, "a top-1 combine `w * y` with no sum over the slots is read only when "
                               "y is the chosen expert's FFN with its weights gathered per token "
                               "(W[ids[:, 0]]); not yet for dense or sorted top-1 outputs", OP)
            ffn, weights, ids = got
            num_e = _shape(ffn.w_down)[0]
            return _proposal(view, anchor, ffn, weights, ids, num_e, "gather", weights.aval.dtype)
        if eqn.primitive.name == "add":
            got = slot_loop_outputs(view, eqn.outvars[0])
            if got is not None:
                ffn, weights, ids = got
                return _proposal(
                    view, anchor, ffn, weights, ids, _shape(ffn.w_down)[0], "gather", weights.aval.dtype
                )
            got = looped_expert_outputs(view, eqn.outvars[0])
            if got is None and _adds_scaled_term(view, eqn):
                return NoMatch(
                    anchor,
                    "a sum of experts run on the tokens scaled by their router weights (weights on the "
                    "input), read only with one term per expert e < E of the same FFN, ids that never "
                    "repeat for a token (a top_k's) and no expert biases (an expert not chosen runs on "
                    "zero rows: its FFN_e(0) must be 0)",
                    OP,
                )
            if got is None:
                return NoMatch(
                    anchor,
                    "a sum of per-expert terms, but not one term per expert e < E of the same FFN, "
                    "each reading expert e's weights (the e-th slice of stacked weights, or arrays of "
                    "its own that agree across experts in shape, dtype and layout)",
                    OP,
                )
            ffn, weights, ids = got
            if ffn.row_scale is not None:  # weights on the input: the expert outputs summed with weight 1
                return _proposal(view, anchor, ffn, weights, ids, _num_experts(ffn), "loop",
                                 eqn.outvars[0].aval.dtype, on_input=True)
            return _proposal(view, anchor, ffn, weights, ids, _num_experts(ffn), "loop", weights.aval.dtype)
        if eqn.primitive.name in ("gather", "scatter"):
            return self._match_top1_unsummed(view, anchor)
        ws = _weighted_sum(view, eqn)
        sm = _plain_sum(view, eqn) if ws is None else _Sum(ws[0], ws[2], ws[3], eqn.outvars[0].aval.dtype)
        if ws is None and sm is None:
            return NoMatch(anchor, "not a weighted sum of expert outputs", OP)
        if ws is None or (view.scalar(ws[1]) == 1.0 and _scaled_experts(view, sm) is not None):
            return self._match_unweighted(view, anchor, sm)
        o_atom, w_atom, o_sum, o_tok = ws
        comb = combine_matrix(view, w_atom) or masked_combine(view, w_atom)
        if comb is not None:
            weights, ids, num_e = comb
            ffn = dense_expert_outputs(view, o_atom, num_e)
            if ffn is None:
                return NoMatch(
                    anchor,
                    "combine matrix found, but the combined values are not recognised as "
                    "every expert's FFN on every token",
                    OP,
                )
            if ffn.labels[o_sum] != "E" or tuple(ffn.labels[d] for d in o_tok) != token_labels(len(o_tok)):
                return NoMatch(anchor, "the combine does not sum expert outputs over experts per token", OP)
            dispatch = "dense"
            if ffn.row_scale is not None and _routing_mask(view, ffn.row_scale.weights, ids, num_e):
                # x * 1 on each expert's routed tokens, zero rows elsewhere that the combine weighs by 0
                ffn, dispatch = dataclasses.replace(ffn, row_scale=None), "masked"
            if ffn.row_scale is not None:
                return NoMatch(anchor, _BOTH, OP)
            return _proposal(view, anchor, ffn, weights, ids, num_e, dispatch, w_atom.aval.dtype)
        choices = choice_combine(view, w_atom)
        if choices is not None:
            weights, ids, num_e = choices
            ffn = dense_expert_outputs(view, o_atom, num_e)
            if ffn is not None and ffn.row_scale is None and ffn.labels[o_sum] == "E" and tuple(
                ffn.labels[d] for d in o_tok
            ) == token_labels(len(o_tok)):
                return _proposal(view, anchor, ffn, weights, ids, num_e, "dense", w_atom.aval.dtype)
        picked = _picked_dense_outputs(view, o_atom, o_sum, o_tok)
        if picked is not None:
            ffn, ids, num_e = picked
            if ffn.row_scale is not None:
                return NoMatch(anchor, _BOTH, OP)
            return _proposal(view, anchor, ffn, view.uncast(w_atom), ids, num_e, "dense", w_atom.aval.dtype)
        o_rows = view.uncast(o_atom)  # expert outputs upcast for the combine (ffn_precision checks it)
        dispatch, got = "gather", gathered_expert_outputs(view, o_rows)
        if got is None:
            dispatch, got = "sorted", sorted_expert_outputs(view, o_rows)
        if got is None:
            return NoMatch(anchor, "no combine of expert outputs by router weights", OP)
        ffn, ids = got
        if ffn.labels[o_sum] != "K" or tuple(ffn.labels[d] for d in o_tok) != token_labels(len(o_tok)):
            return NoMatch(anchor, "the combine does not sum the k expert outputs per token", OP)
        if ffn.row_scale is not None:
            return NoMatch(anchor, _BOTH, OP)
        weights = view.uncast(w_atom)
        combine_dtype = eqn.outvars[0].aval.dtype if eqn.primitive.name == "reduce_sum" else w_atom.aval.dtype
        return _proposal(view, anchor, ffn, weights, ids, _shape(ffn.w_down)[0], dispatch, combine_dtype)

    def _match_scatter(self, view: View, anchor: int) -> Proposal | NoMatch:
        y = view.jaxpr.eqns[anchor].outvars[0]
        dispatch, got = "sorted", sorted_scatter_combine(view, y)
        if got is None:
            dispatch, got = "gather", pair_scatter_combine(view, y)
        if got is None:
            return NoMatch(anchor, "scatter-add of expert rows not recognised as a weighted MoE combine", OP)
        ffn, ids, weights = got
        if ffn.row_scale is not None:
            return NoMatch(anchor, _BOTH, OP)
        return _proposal(view, anchor, ffn, weights, ids, _shape(ffn.w_down)[0], dispatch, y.aval.dtype)

    def _match_unweighted(self, view: View, anchor: int, sm: _Sum) -> Proposal | NoMatch:
        """The expert outputs summed with weight 1: experts run on rows the router weights scaled."""
        got = _scaled_experts(view, sm)
        if got is None:
            return NoMatch(anchor, "the expert outputs are summed with weight 1 and no router weight scales "
                           "the tokens before the experts: no routing weights", OP)
        if isinstance(got, str):
            return NoMatch(anchor, got, OP)
        ffn, weights, ids, num_e, dispatch = got
        return _proposal(view, anchor, ffn, weights, ids, num_e, dispatch, sm.dtype, on_input=True)

    def _match_top1_unsummed(self, view: View, anchor: int) -> Proposal | NoMatch:
        got = _top1_unsummed(view, view.jaxpr.eqns[anchor])
        if got is None:
            return NoMatch(anchor, "not the expert outputs of a top-1 block put back in token order", OP)
        ffn, ids = got
        y_dtype = view.jaxpr.eqns[anchor].outvars[0].aval.dtype  # (one output per token: its "sum")
        return _proposal(view, anchor, ffn, ffn.row_scale.weights, ids, _shape(ffn.w_down)[0], "sorted",
                         y_dtype, on_input=True)


_BOTH = ("the router weights scale the tokens before the experts, and the experts' outputs are weighted "
         "too: neither form of the fused op (weights on the output, or on the input with the outputs summed "
         "with weight 1)")


class _Sum(NamedTuple):
    """y[..t, d] = sum_s o[..t, s, d] with weight 1 (a plain sum, or a contraction with ones)."""

    o: Any
    axis: int  # the summed dim of o
    toks: tuple[int, ...]  # o's token dims
    dtype: Any  # the dtype the sum runs in


def _plain_sum(view: View, eqn: Any) -> _Sum | None:
    """The sum over one dim of o [..T, s, D] (not its last), of values that are not a product."""
    if eqn.primitive.name != "reduce_sum" or len(eqn.params["axes"]) != 1:
        return None
    o = view.canon(eqn.invars[0])
    (axis,) = eqn.params["axes"]
    rank = len(_shape(o))
    if rank < 3 or axis == rank - 1 or view.op(view.uncast(o)) == "mul":
        return None
    return _Sum(o, axis, tuple(d for d in range(rank - 1) if d != axis), eqn.outvars[0].aval.dtype)


def _scaled_experts(view: View, sm: _Sum) -> tuple | str | None:
    """(ffn, weights, ids, E, dispatch) if sm sums expert outputs of rows scaled by router weights, a
    reason when those are recognised but do not fit the fused op, None when they are not found."""
    ffn, dispatch = dense_expert_outputs(view, sm.o, _shape(sm.o)[sm.axis]), "dense"
    if ffn is None or ffn.row_scale is None:
        o_rows = view.uncast(sm.o)
        got = gathered_expert_outputs(view, o_rows)
        dispatch = "gather" if got is not None else "sorted"
        got = got or sorted_expert_outputs(view, o_rows)
        if got is None or got[0].row_scale is None:
            return None
        (ffn, ids), num_e, weights = got, _shape(got[0].w_down)[0], got[0].row_scale.weights
        summed = "K"
    else:
        comb = combine_matrix(view, ffn.row_scale.weights)
        if comb is None:
            return ("every expert runs on the tokens scaled by a [T, E] matrix that is not the router's "
                    "weights at its chosen experts (sum_j w_j one_hot(ids_j)): not a routed block")
        if any(b is not None for b in ffn.biases):
            return ("every expert runs on the scaled tokens, the experts not chosen on zero rows: with "
                    "expert biases their FFN_e(0) != 0 is part of the sum, and the fused op runs only the "
                    "chosen experts")
        weights, ids, num_e = comb
        summed = "E"
    if ffn.labels[sm.axis] != summed or tuple(ffn.labels[d] for d in sm.toks) != token_labels(len(sm.toks)):
        return "the sum does not run over each token's expert outputs"
    return ffn, weights, ids, num_e, dispatch


def _top1_unsummed(view: View, eqn: Any) -> tuple | None:
    """(ffn, ids) if eqn puts the outputs of a top-1 sorted block of scaled rows back in token order
    (one slot: nothing to sum), and the program does not weight them again (the combine's anchor
    declines that block)."""
    if len(eqn.outvars) != 1 or len(_shape(eqn.outvars[0])) != 2:
        return None
    got = sorted_token_outputs(view, eqn.outvars[0])
    if got is None or got[0].row_scale is None or _weighted_after(view, eqn.outvars[0], got[1]):
        return None
    return got


_LAYOUT_OPS = frozenset({"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "convert_element_type"})


def _weighted_after(view: View, out: Any, ids: Any) -> bool:
    """Whether `out` (through layout ops) is multiplied by weights of the router's choice of ids, or
    combined by a weighted sum with weights other than 1."""
    frontier = [out]
    for _ in range(4):
        users = [u for v in frontier for u in view.users(v)]
        for u in users:
            if u.primitive.name == "mul" and any(
                idioms.from_choice(view, view.uncast(idioms.unexpand(view, a)[0]), ids) for a in u.invars
            ):
                return True
            ws = _weighted_sum(view, u)
            if ws is not None and view.scalar(ws[1]) != 1.0:
                return True
        frontier = [u.outvars[0] for u in users if u.primitive.name in _LAYOUT_OPS]
    return False


def _picked_dense_outputs(
    view: View, o_atom: Any, o_sum: int, o_tok: tuple[int, ...]
) -> tuple[ExpertFfn, Any, int] | None:
    """(ffn, ids, E) for o [..T, k, D] = every expert's FFN on every token [..T, E, D] with the k outputs
    at ids picked along E (`take_along_axis(y, ids[..., None], axis)`); the ids must be valid experts
    (a pick out of range would read a fill value where the fused op adds nothing)."""
    got = idioms.take_rows_along(view, o_atom)
    if got is None:
        return None
    dense, ids, axis = got
    nt = len(o_tok)
    num_e = _shape(dense)[axis]
    if axis != nt or o_sum != nt or o_tok != tuple(range(nt)) or not idioms.indices_below(view, ids, num_e):
        return None
    ffn = dense_expert_outputs(view, dense, num_e)
    if ffn is None or ffn.labels != (*token_labels(nt), "E", "D"):
        return None
    return ffn, ids, num_e


def _is_loop_sum_root(view: View, eqn: Any) -> bool:
    """The last add of a chain that adds weighted expert terms: w_e[:, None] * FFN_e(x) per expert,
    or w[:, j, None] * FFN(x; W[ids[:, j]]) per slot."""
    if not _adds_expert_term(view, eqn):
        return False
    return not any(
        u.primitive.name == "add" and _adds_expert_term(view, u) for u in view.users(eqn.outvars[0])
    )


def _is_single_slot(view: View, eqn: Any) -> bool:
    """A top-1 block's combine `w * y` with no sum over the slots: a [..T, 1] router weight of a top-1
    choice (its one column) times a [T, D] matmul result (tokens scaled before the experts are not), and
    no add of loop terms above it (that add is the anchor then)."""
    if len(_shape(eqn.outvars[0])) != 2:
        return False
    for side in view.args(eqn.outvars[0]):
        col = slot_column(view, side, whole=True)
        if col is None or _shape(col[0])[1:] != (1,) or not jnp.issubdtype(side.aval.dtype, jnp.floating):
            continue
        other = next(a for a in view.args(eqn.outvars[0]) if a is not view.canon(side))
        if _from_top1(view, col[0]) and view.op(idioms.unexpand(view, view.uncast(other))[0]) in _MATMULS:
            users = view.users(eqn.outvars[0])
            return not any(u.primitive.name == "add" and _adds_expert_term(view, u) for u in users)
    return False


_MATMULS = frozenset({"dot_general", "ragged_dot_general", "ragged_dot"})


def _from_top1(view: View, atom: Any, depth: int = 6) -> bool:
    """Whether atom [..T, 1] is computed, elementwise in its own layout, from a top-1 choice: the values
    of a `top_k(.., 1)`, or scores gathered at its ids (a shared expert's [T, 1] gate is not)."""
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is None:
        return False
    if eqn.primitive.name in ("top_k", "approx_top_k"):
        return view.out_index(atom) == 0
    if eqn.primitive.name == "gather" and (ta := idioms.take_along_axis(view, atom)) is not None:
        ids = view.producer(ta[1])
        return ids is not None and ids.primitive.name in ("top_k", "approx_top_k")
    return depth > 0 and any(
        _from_top1(view, a, depth - 1) for a in view.args(atom) if _shape(a) == _shape(atom)
    )


def _adds_scaled_term(view: View, eqn: Any) -> bool:
    """Whether eqn adds FFN_e(x * weight_e[:, None]): the loop of Llama4's weights on the input."""
    return any(view.op(t) != "mul" and scaled_loop_term(view, t) for t in view.args(eqn.outvars[0]))


def _adds_expert_term(view: View, eqn: Any) -> bool:
    if _adds_scaled_term(view, eqn):
        return True
    for term in view.args(eqn.outvars[0]):
        if view.op(term) != "mul":
            continue
        for side in view.args(term):
            base, _ = idioms.unexpand(view, side)
            if loop_expert_weight(view, base) is not None:
                return True
            if slot_column(view, side) is not None and jnp.issubdtype(side.aval.dtype, jnp.floating):
                return True  # w[:, j, None] * FFN_slot_j(x): the loop over the k slots
    return False


def _weighted_sum(view: View, eqn: Any) -> tuple[Any, Any, int, tuple[int, ...]] | None:
    """(o, w, summed dim of o, token dims of o) for y[..t, d] = sum_s o[..t, s, d] * w[..t, s].

    Spelled as `einsum('tsd,ts->td')` (a dot_general batching the token dims and contracting s)
    or as `sum(o * w[..., None], axis=s)`. w's dims must be (tokens..., summed); o has one more.
    """
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        for w_i in (0, 1):
            w, o = eqn.invars[w_i], eqn.invars[1 - w_i]
            w_con, w_bat = ((lc, lb), (rc, rb))[w_i]
            o_con, o_bat = ((lc, lb), (rc, rb))[1 - w_i]
            nt = len(_shape(w)) - 1
            if nt < 1 or len(_shape(o)) != nt + 2 or len(o_con) != 1 or len(o_bat) != nt:
                continue
            if (tuple(w_con), tuple(w_bat)) == ((nt,), tuple(range(nt))):
                return o, w, o_con[0], tuple(o_bat)
        return None
    if eqn.primitive.name == "reduce_sum" and len(eqn.params["axes"]) == 1:
        prod = view.uncast(eqn.invars[0])  # products may be upcast before the sum
        if view.op(prod) != "mul":
            return None
        (axis,) = eqn.params["axes"]
        a, b = view.args(prod)
        for o, wexp in ((a, b), (b, a)):
            w, dims = idioms.unexpand(view, view.uncast(wexp))
            w = view.uncast(w)
            nt = len(_shape(w)) - 1
            if nt < 1 or len(_shape(o)) != nt + 2 or dims.get(nt) != axis:
                continue
            toks = tuple(dims.get(i) for i in range(nt))
            if None not in toks and axis not in toks:  # o's remaining dim is a broadcast of w
                return o, w, axis, toks
    return None


MOE = MoePattern()


def combine_matrix(view: View, atom: Any) -> tuple[Any, Any, int] | None:
    """(weights [..T, k], ids [..T, k], E) if atom [..T, E] is sum_j weights[..t, j] * (ids[..t, j] == e).

    Spelled as `sum(one_hot(ids, E) * w[..., None], axis=-2)` or `where(one_hot, w, 0)` summed,
    `einsum('tk,tke->te', w, one_hot)`, a scatter of w into zeros at (..t, ids) (`.at[rows, ids].set(w)`),
    or for k = 1 `one_hot(ids[..., 0], E) * w` (w [..T, 1]).
    """
    atom = view.uncast(atom)
    name = view.op(atom)
    rank = len(_shape(atom))
    if rank < 2:
        return None
    num_e, nt = _shape(atom)[-1], rank - 1
    if name == "reduce_sum" and tuple(view.params(atom)["axes"]) == (nt,):
        (prod,) = view.args(atom)
        if view.op(prod) == "select_n":  # where(one_hot(ids, E), w[..., None], 0)
            pred, zero, w_side = view.args(prod)
            pairs = [(pred, w_side)] if view.scalar(zero) == 0.0 else []
        elif view.op(prod) == "mul":
            a, b = view.args(prod)
            pairs = [(a, b), (b, a)]
        else:
            return None
        for oh_side, w_side in pairs:
            oh = idioms.one_hot(view, oh_side)
            w_base, dims = idioms.unexpand(view, w_side)
            if oh is None or oh[1] != num_e or _shape(w_base) != _shape(oh[0]):
                continue
            if all(dims.get(i) == i for i in range(nt + 1)):
                return w_base, oh[0], num_e
        return None
    if name == "dot_general":  # einsum('tk,tke->te', w, one_hot(ids, E))
        eqn = view.producer(atom)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        w, oh_atom = (view.canon(v) for v in eqn.invars)
        (wc, wb), (oc, ob) = (lc, lb), (rc, rb)
        if len(_shape(w)) == nt + 2:
            w, oh_atom, (wc, wb), (oc, ob) = oh_atom, w, (oc, ob), (wc, wb)
        oh = idioms.one_hot(view, oh_atom)
        if oh is None or oh[1] != num_e or len(_shape(w)) != nt + 1:
            return None
        toks = tuple(range(nt))
        if (tuple(wc), tuple(wb), tuple(oc), tuple(ob)) != ((nt,), toks, (nt,), toks):
            return None
        if w is not view.uncast(w):
            return None
        return (w, oh[0], num_e) if _shape(oh[0]) == _shape(w) else None
    if name == "mul":  # top-1: one_hot(ids[:, 0], E) * w with w [..T, 1], no sum over the one slot
        for oh_side, w_side in itertools.permutations(view.args(atom)):
            oh = idioms.one_hot(view, oh_side)
            ids = None if oh is None or oh[1] != num_e else view.reshaped_from(oh[0])
            w, dims = idioms.unexpand(view, w_side)
            if ids is not None and _shape(ids) == _shape(w) == (*_shape(atom)[:-1], 1) and all(
                dims.get(i) == i for i in range(nt)
            ):
                return w, ids, num_e
        return None
    got = idioms.put_along_last_axis(view, atom)
    if got is None or not view.is_nonneg_index(got[0]):
        return None
    if name == "scatter" and not idioms.distinct_along_last(view, got[0]):
        return None  # `.set` keeps one of two weights written to the same expert; the op sums them
    return got[1], got[0], num_e


@dataclasses.dataclass(frozen=True)
class DenseWeights:
    """The router weights as the program combines them: a [..T, E] matrix that is 0 off each token's
    chosen experts (or NaN across the token's row), so the weighted sum over E reads only its entries at
    the ids, which the fused op takes as its [..T, k] weights (`jnp.take_along_axis(matrix, ids, -1)`)."""

    matrix: Any


def masked_combine(view: View, atom: Any) -> tuple[DenseWeights, Any, int] | None:
    """(DenseWeights(atom), ids, E) if atom [..T, E] is 0 at every expert outside the distinct ids
    (a top_k's), or NaN across a row:

    - `where(mask, s, 0)`, the mask true exactly at the ids (`one_hot(ids).sum(-2) > 0`, a scatter of
      True);
    - that divided by its own sum over E, for s >= 0 (a softmax, sigmoid or exp: a zero sum makes the
      whole row 0 / 0);
    - `softmax(where(mask, logits, -inf))` over E (exp(-inf) = 0; a row of -inf is NaN throughout).
    """
    base = view.uncast(atom)
    rank = len(_shape(base))
    if rank < 2:
        return None
    num_e = _shape(base)[-1]
    got = idioms.masked_at_choice(view, base)
    if got is None and (m := idioms.renormalised(view, base)) is not None:
        masked = idioms.masked_at_choice(view, m)
        got = masked if masked is not None and _nonneg_scores(view, masked[0]) else None
    if got is None and (sm := idioms.softmax(view, base)) is not None and sm.axis == rank - 1:
        got = idioms.masked_at_choice(view, sm.operand, fill=float("-inf"))
    return None if got is None else (DenseWeights(atom), got[1], num_e)


def _routing_mask(view: View, s: Any, ids: Any, num_e: int) -> bool:
    """Whether s [..T, E] is 1 exactly at each token's experts in ids and 0 elsewhere (`one_hot(ids[:, 0])`
    for k = 1, `one_hot(ids).sum(-2)` or a scatter of ones for distinct ids): a dispatch mask, so the
    tokens it scales are each expert's routed tokens as they are (x * 1) and zero rows elsewhere."""
    if not idioms.distinct_along_last(view, ids):
        return False
    base = view.uncast(s)
    chosen = idioms.chosen_along_last(view, base, num_e)
    if chosen is None and (oh := idioms.one_hot(view, base)) is not None and oh[1] == num_e:
        chosen = view.reshaped_from(oh[0])
    return chosen is not None and view.same(chosen, ids)


def _nonneg_scores(view: View, s: Any) -> bool:
    """Whether s is a softmax, sigmoid or exp (>= 0 or NaN everywhere it is defined)."""
    return idioms.softmax(view, s) is not None or idioms.sigmoid(view, s) is not None or view.op(s) == "exp"


def _proposal(
    view: View,
    anchor: int,
    ffn: ExpertFfn,
    weights: Any,
    ids: Any,
    num_e: int,
    dispatch: str,
    combine_dtype: Any,
    on_input: bool = False,
) -> Proposal | NoMatch:
    """The fused op for a recognised block; it rounds where the program does (`ffn_precision`), and
    the combine runs in the dtype the program used for it (with `on_input`, the router weights scale
    the rows before the experts and the outputs are summed in it: weights_on_input)."""
    from moefuse.kernels.moe import EXPERT_WEIGHTS_PARAM, MoeParams, moe_ffn

    y = view.jaxpr.eqns[anchor].outvars[0]
    biases = [b for b in ffn.biases if b is not None]
    layout = _fused_layout(ffn)
    gated = ffn.w_up is not None
    expert_weights = [ffn.w_gate] + ([ffn.w_up] if gated else []) + [ffn.w_down]
    arrays = [_arrays(w) for w in expert_weights]  # a matrix kept per expert is E inputs of the op
    bias_arrays = [_arrays(b.array) for b in biases]  # a bias kept per expert: E inputs too
    choices = isinstance(ids, tuple)  # one [..T] array per choice: the op stacks them along k
    dense_weights = isinstance(weights, DenseWeights)  # read at the ids in the emit
    w_in_op, ids_in_op = (list(weights), list(ids)) if choices else ([weights], [ids])
    if dense_weights:
        w_in_op = [weights.matrix]
    inputs = [ffn.x, *w_in_op, *ids_in_op, *(a for group in arrays + bias_arrays for a in group)]
    scale_dtype = None
    if on_input:  # the op multiplies x * w as jnp does, in their promoted dtype
        scale_dtype = jnp.dtype(ffn.row_scale.dtype)
        if choices or scale_dtype != jnp.result_type(ffn.x.aval.dtype, weights.aval.dtype):
            return NoMatch(anchor, f"the tokens are scaled in {scale_dtype.name}, not in the dtype of "
                           "tokens times weights", OP)
    # the scaled rows carry the router weights into the experts: that is the op's own rounding there
    block = FfnValues(ffn.x, arrays, inputs, [] if on_input else w_in_op, y, combine_dtype,
                      bool(biases), scale_dtype)
    prec = ffn_precision(view, block)
    if isinstance(prec, str):
        return NoMatch(anchor, prec, OP)
    params = MoeParams(
        num_experts=num_e,
        k=len(ids) if choices else _shape(ids)[-1],
        **kernel_activation(ffn.activation),
        fused_gate_up=layout is not None,
        gate_up_layout=layout or "concat",
        has_expert_bias=bool(biases),
        weights_dtype=jnp.dtype(combine_dtype).name,
        compute_dtype=prec.compute_dtype,
        projection_dtype=prec.projection_dtype,
        activation_dtype=prec.activation_dtype,
        out_dtype=prec.out_dtype,
        hidden_dtype=prec.hidden_dtype,
        weights_on_input=on_input,
        **dict(ffn.act_params),
    )
    n_r = len(w_in_op) + len(ids_in_op)  # the router weights and the ids

    def emit(kernel: str, x: Any, *rest: Any) -> list[Any]:
        if choices:
            w = _stacked_choices(rest[: len(w_in_op)])
            i = _stacked_choices(rest[len(w_in_op) : n_r]).astype(jnp.int32)  # integer expert ids < E
        else:
            w, i = rest[0], rest[1]
        if dense_weights:
            w = jnp.take_along_axis(w, i.astype(jnp.int32), axis=-1)
        given = iter(rest[n_r:])
        ws = [_values_of(given, m, group) for m, group in zip(expert_weights, arrays)]
        bs = [_values_of(given, b.array, group) for b, group in zip(biases, bias_arrays)]
        w_in, wd, b_in, b_down = _kernel_weights(ffn, layout, ws, bs, x.dtype)
        # several token dims ([B, S, D]) run as [B * S, D]; the recognisers proved that x, w, ids and
        # y list the tokens in the same row-major order (y may also hold unit dims that x lacks)
        # (the weights as their T * k entries in row-major (t, j) order, whatever their own shape)
        x, i = x.reshape(-1, x.shape[-1]), i.reshape(-1, i.shape[-1])
        w = w.reshape(i.shape)
        out = moe_ffn(x, w, i, w_in, wd, params, b_in=b_in, b_down=b_down, impl=kernel)
        return [out.reshape(y.aval.shape).astype(y.aval.dtype)]

    described = plan_params(params, dispatch)
    if any(isinstance(m, PerExpertWeights) for m in [*expert_weights, *(b.array for b in biases)]):
        described[EXPERT_WEIGHTS_PARAM] = "per_expert"
    notes = ("the router weights are a [.., E] matrix that is 0 off each token's chosen experts: the op "
             "reads them at the ids",) if dense_weights else ()
    routed = Proposal(op=OP, anchor=anchor, inputs=inputs, outputs=[y], params=described, emit=emit,
                      notes=notes)
    return with_shared_expert(view, routed, ffn.x)


def _stacked_choices(arrays: tuple[Any, ...]) -> Any:
    """One [..T, k] array of the k per-choice arrays [..T] (or [..T, 1])."""
    tokens = min((jnp.shape(a) for a in arrays), key=len)
    return jnp.stack([a.reshape(tokens) for a in arrays], axis=-1)


def choice_combine(view: View, atom: Any) -> tuple[tuple[Any, ...], tuple[Any, ...], int] | None:
    """(weights, ids, E), one [..T] array per choice in each, if atom [..T, E] = sum over the choices c of
    w_c[..t] * (ids_c[..t] == e): terms `one_hot(ids_c, E) * w_c[..., None]` or `where(one_hot(ids_c, E),
    w_c[..., None], 0)` added up (`one_hot(first) * w[:, :1] + one_hot(second) * w[:, 1:]`), or one such
    term (top-1 by `where(arange(E) == argmax, max, 0)`). w_c may keep a unit dim ([..T, 1])."""
    atom = view.uncast(atom)
    rank = len(_shape(atom))
    if rank < 2:
        return None
    num_e, tokens = _shape(atom)[-1], _shape(atom)[:-1]
    ws, ids = [], []
    for term in _added_terms(view, atom):
        got = _choice_term(view, term, num_e, tokens)
        if got is None:
            return None
        ws.append(got[0])
        ids.append(got[1])
    return tuple(ws), tuple(ids), num_e


def _added_terms(view: View, atom: Any) -> list[Any]:
    atom = view.canon(atom)
    if view.op(atom) == "add":
        return [t for a in view.args(atom) for t in _added_terms(view, a)]
    return [atom]


def _choice_term(view: View, term: Any, num_e: int, tokens: tuple[int, ...]) -> tuple[Any, Any] | None:
    """(w_c, ids_c) for term [..T, E] = w_c[..., None] * (ids_c[..., None] == arange(E))."""
    if view.op(term) == "select_n":
        pred, zero, w_side = view.args(term)
        pairs = [(pred, w_side)] if view.scalar(zero) == 0.0 else []
    elif view.op(term) == "mul":
        pairs = [tuple(view.args(term)), tuple(view.args(term))[::-1]]
    else:
        return None
    for oh_side, w_side in pairs:
        oh = idioms.one_hot(view, oh_side)
        if oh is None or oh[1] != num_e or _shape(oh[0]) != tokens or not jnp.issubdtype(
            oh[0].aval.dtype, jnp.integer
        ):
            continue
        w, dims = idioms.unexpand(view, w_side)
        nt = len(tokens)
        keeps_tokens = all(dims.get(d) == d for d in range(nt))
        if keeps_tokens and (_shape(w) == tokens or (_shape(w) == (*tokens, 1) and dims.get(nt) == nt)):
            return view.uncast(w), oh[0]
    return None


def _fused_layout(ffn: ExpertFfn) -> str | None:
    """"concat" / "interleaved" when gate and up are the two halves of one weight (and one bias), else None.

    Then the kernel takes the fused weight as it is, without copying out the halves.
    """
    if ffn.w_up is None or ffn.w_up is not ffn.w_gate or ffn.gate_cols is None or ffn.up_cols is None:
        return None
    b_gate, b_up, _ = ffn.biases
    if (b_gate is None) != (b_up is None):
        return None
    if b_gate is not None and (
        b_gate.array is not b_up.array or (b_gate.cols, b_up.cols) != (ffn.gate_cols, ffn.up_cols)
    ):
        return None
    f2 = _shape(ffn.w_gate)[ffn.w_gate_dims.index("F")]
    g, u = list(range(f2)[slice(*ffn.gate_cols)]), list(range(f2)[slice(*ffn.up_cols)])
    if g == list(range(f2 // 2)) and u == list(range(f2 // 2, f2)):
        return "concat"
    if g == list(range(0, f2, 2)) and u == list(range(1, f2, 2)):
        return "interleaved"
    return None


def _kernel_weights(ffn: ExpertFfn, layout: str | None, ws: list[Any], bs: list[Any], dtype: Any) -> tuple:
    """(w_in, w_down, b_in, b_down) in the kernel's layouts ([E, D, F], [E, F, D], [E, F], [E, D]); a
    matrix or bias kept per expert (its E values as a tuple in ws / bs) as the kernel's `PerExpert` of
    [D, F] ... / [F] ..."""
    wg, wu, wd = (ws[0], ws[1], ws[2]) if ffn.w_up is not None else (ws[0], None, ws[1])
    given = iter(bs)
    b_gate, b_up, b_down = ((next(given), b) if b is not None else (None, None) for b in ffn.biases)
    wd = _in_layout(wd, ffn.w_down_dims, "EFD")
    if layout is not None:
        w_in = _in_layout(wg, ffn.w_gate_dims, "EDF")
        b_in = None if b_gate[1] is None else jnp.transpose(b_gate[0], _perm(b_gate[1].labels, "EF"))
    else:
        w_in = _in_layout(_cols(wg, ffn.w_gate_dims, ffn.gate_cols), ffn.w_gate_dims, "EDF")
        b_in = _bias(b_gate, "EF")
        if wu is not None:
            w_in = (w_in, _in_layout(_cols(wu, ffn.w_up_dims, ffn.up_cols), ffn.w_up_dims, "EDF"))
            b_in = (b_in, _bias(b_up, "EF"))
    b_down = _bias(b_down, "ED")
    if not any(b is not None for b in ffn.biases):
        return w_in, wd, None, None
    e, f, d = wd.shape
    zeros = lambda shape: jnp.zeros(shape, dtype)
    if isinstance(b_in, tuple):
        b_in = tuple(zeros((e, f)) if b is None else b for b in b_in)
    elif b_in is None:
        b_in = zeros((e, w_in.shape[2]))
    return w_in, wd, b_in, zeros((e, d)) if b_down is None else b_down


def _in_layout(w: Any, dims: tuple[str, ...], want: str) -> Any:
    """A stacked weight transposed to the kernel's layout `want`; a tuple of E per-expert values (each
    labelled by dims, without "E") as the kernel's `PerExpert`, each array transposed to want[1:]."""
    from moefuse.kernels.moe import PerExpert

    if isinstance(w, tuple):
        return PerExpert(tuple(jnp.transpose(a, _perm(dims, want[1:])) for a in w))
    return jnp.transpose(w, _perm(dims, want))


def _arrays(w: Any) -> tuple[Any, ...]:
    """The arrays the fused op takes for one expert matrix: the stacked array, or the E arrays of a
    matrix kept per expert."""
    return w.arrays if isinstance(w, PerExpertWeights) else (w,)


def _values_of(given: Any, m: Any, group: tuple[Any, ...]) -> Any:
    """The next of the op's input values for one expert matrix or bias `m` (`group` its arrays): the
    stacked array, or the tuple of the E arrays of one kept per expert."""
    return tuple(next(given) for _ in group) if isinstance(m, PerExpertWeights) else next(given)


def _num_experts(ffn: ExpertFfn) -> int:
    """E: the expert dim of the stacked W_down, or the number of its per-expert arrays."""
    return len(ffn.w_down.arrays) if isinstance(ffn.w_down, PerExpertWeights) else _shape(ffn.w_down)[0]


def _bias(given: tuple[Any, Bias | None], want: str) -> Any:
    """A bias in the kernel's layout `want`, cut to the columns its projection keeps."""
    arr, bias = given
    if bias is None:
        return None
    if bias.cols is not None:
        arr = _cols(arr, bias.labels, bias.cols)
    return _in_layout(arr, bias.labels, want)  # a bias kept per expert: the kernel's `PerExpert`


def plan_params(params: Any, dispatch: str) -> dict[str, Any]:
    """The MoeParams fields that matter for this op (the Plan shows only those), and the dispatch."""
    shown = {key: val for key, val in params.describe().items() if _relevant(params, key)}
    return shown | {"dispatch": dispatch}


def _relevant(params: Any, key: str) -> bool:
    """Whether a MoeParams field matters for this op."""
    if key in ("swiglu_alpha", "swiglu_limit"):
        return params.activation == "swiglu_oai"
    if key == "gelu_approximate":
        return params.activation in ("gelu", "geglu")
    if key == "gate_up_layout":
        return params.fused_gate_up
    if key in ("capacity_order", "capacity_groups"):
        return params.capacity is not None
    return True


def _cols(w: Any, dims: tuple[str, ...], cols: Cols | None) -> Any:
    """The F columns `cols` of a fused gate/up weight (all of w when cols is None)."""
    return w if cols is None else lax.slice_in_dim(w, cols[0], cols[1], cols[2], axis=dims.index("F"))


def _perm(dims: tuple[str, ...], want: str) -> tuple[int, ...]:
    return tuple(dims.index(c) for c in want)
