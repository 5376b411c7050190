"""Whole-MoE pattern: every expert's FFN combined by the router's weights, fused into `moe`.

Recognised today: the dense spelling (all experts on all tokens, then a [T, E] combine matrix
built from the router's (weights, ids) by one-hot or scatter), in any einsum dim order, with
SwiGLU / GeGLU / GELU / ReLU / SiLU experts. The fused op does only the routed work::

    gate = jnp.einsum("td,edf->tef", x, w_gate); up = jnp.einsum("td,edf->tef", x, w_up)
    out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, w_down)
    combine = jnp.sum(jax.nn.one_hot(ids, E) * weights[..., None], axis=1)
    y = jnp.einsum("ted,te->td", out, combine)          # -> moe(x, weights, ids, w_gate, w_up, w_down)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
from jax import lax

from moefuse import idioms
from moefuse.match import NoMatch, Proposal
from moefuse.patterns.experts import (
    ExpertFfn,
    dense_expert_outputs,
    gathered_expert_outputs,
    looped_expert_outputs,
    sorted_expert_outputs,
    sorted_scatter_combine,
)
from moefuse.view import View

OP = "moe"
SUPPORTED = (
    (
        OP,
        "dense experts + combine matrix",
        "`einsum('td,edf->tef')` per projection (any dim order, "
        "fused gate/up split), `vmap` over experts; combine by `one_hot(ids) * w` summed over k or by "
        "scatter of w",
        "num_experts, k, activation",
    ),
    (
        OP,
        "sorted dispatch",
        "argsort of flat ids, `x[perm // k]`, bincount / one_hot-sum group sizes, `lax.ragged_dot` "
        "(separate or split gate/up), unpermute by inverse-permutation gather or scatter, or a weighted "
        "`.at[perm // k].add`",
        "num_experts, k, activation",
    ),
    (
        OP,
        "Python loop over experts",
        "`for e in range(E)`: `sum(where(ids == e, w, 0), -1)[:, None] * ffn(x, w1[e], ...)`",
        "num_experts, k, activation",
    ),
    (
        OP,
        "per-token weight gather",
        "`w[ids]` / `jnp.take` -> `einsum('td,tkdf->tkf')` (also `[B, S, D]` tokens), combine "
        "`einsum('tkd,tk->td')` or `sum(y * w[..., None], k)`",
        "num_experts, k, activation",
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
                upd = view.canon(e.invars[2])
                if view.op(upd) == "mul" and "ragged_dot_general" in [view.op(a) for a in view.args(upd)]:
                    out.append(i)
            elif e.primitive.name == "add" and _is_loop_sum_root(view, e):
                out.append(i)
            elif _weighted_sum(view, e) is not None:
                out.append(i)
        return out

    def match(self, view: View, anchor: int) -> Proposal | NoMatch:
        eqn = view.jaxpr.eqns[anchor]
        if eqn.primitive.name in ("scatter-add", "scatter_add"):
            return self._match_scatter(view, anchor)
        if eqn.primitive.name == "add":
            got = looped_expert_outputs(view, eqn.outvars[0])
            if got is None:
                return NoMatch(anchor, "a sum of per-expert terms, but not one term per expert FFN", OP)
            ffn, weights, ids = got
            return _proposal(
                view, anchor, ffn, weights, ids, _shape(ffn.w_down)[0], "loop", weights.aval.dtype
            )
        ws = _weighted_sum(view, eqn)
        if ws is None:
            return NoMatch(anchor, "not a weighted sum of expert outputs", OP)
        o_atom, w_atom, o_sum, o_tok = ws
        comb = combine_matrix(view, w_atom)
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
            if ffn.labels[o_sum] != "E" or [ffn.labels[d] for d in o_tok] != ["T"]:
                return NoMatch(anchor, "the combine does not sum expert outputs over experts per token", OP)
            return _proposal(view, anchor, ffn, weights, ids, num_e, "dense", w_atom.aval.dtype)
        dispatch, got = "gather", gathered_expert_outputs(view, o_atom)
        if got is None:
            dispatch, got = "sorted", sorted_expert_outputs(view, o_atom)
        if got is None:
            return NoMatch(anchor, "no combine of expert outputs by router weights", OP)
        ffn, ids = got
        if ffn.labels[o_sum] != "K" or any(ffn.labels[d] != "T" for d in o_tok):
            return NoMatch(anchor, "the combine does not sum the k expert outputs per token", OP)
        weights = _skip_convert(view, w_atom)
        combine_dtype = eqn.outvars[0].aval.dtype if eqn.primitive.name == "reduce_sum" else w_atom.aval.dtype
        return _proposal(view, anchor, ffn, weights, ids, _shape(ffn.w_down)[0], dispatch, combine_dtype)

    def _match_scatter(self, view: View, anchor: int) -> Proposal | NoMatch:
        got = sorted_scatter_combine(view, view.jaxpr.eqns[anchor].outvars[0])
        if got is None:
            return NoMatch(anchor, "scatter-add of expert rows not recognised as a weighted MoE combine", OP)
        ffn, ids, weights = got
        combine_dtype = view.jaxpr.eqns[anchor].outvars[0].aval.dtype
        return _proposal(view, anchor, ffn, weights, ids, _shape(ffn.w_down)[0], "sorted", combine_dtype)


def _is_loop_sum_root(view: View, eqn: Any) -> bool:
    """The last add of a chain that adds per-expert weighted terms (w_e[:, None] * FFN_e(x))."""
    if not _adds_expert_term(view, eqn):
        return False
    return not any(
        u.primitive.name == "add" and _adds_expert_term(view, u) for u in view.users(eqn.outvars[0])
    )


def _adds_expert_term(view: View, eqn: Any) -> bool:
    for term in view.args(eqn.outvars[0]):
        if view.op(term) != "mul":
            continue
        for side in view.args(term):
            base, _ = idioms.unexpand(view, side)
            if view.op(base) == "reduce_sum" and view.op(view.args(base)[0]) == "select_n":
                return True
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
        prod = _skip_convert(view, eqn.invars[0])  # products may be upcast before the sum
        if view.op(prod) != "mul":
            return None
        (axis,) = eqn.params["axes"]
        a, b = view.args(prod)
        for o, wexp in ((a, b), (b, a)):
            w, dims = idioms.unexpand(view, _skip_convert(view, wexp))
            w = _skip_convert(view, w)
            nt = len(_shape(w)) - 1
            if nt < 1 or len(_shape(o)) != nt + 2 or dims.get(nt) != axis:
                continue
            toks = tuple(dims.get(i) for i in range(nt))
            if None not in toks and axis not in toks:  # o's remaining dim is a broadcast of w
                return o, w, axis, toks
    return None


MOE = MoePattern()


def _skip_convert(view: View, atom: Any) -> Any:
    atom = view.canon(atom)
    return view.args(atom)[0] if view.op(atom) == "convert_element_type" else atom


def combine_matrix(view: View, atom: Any) -> tuple[Any, Any, int] | None:
    """(weights [T, k], ids [T, k], E) if atom [T, E] is sum_j weights[t, j] * (ids[t, j] == e)."""
    atom = _skip_convert(view, atom)
    name = view.op(atom)
    if len(_shape(atom)) != 2:
        return None
    num_e = _shape(atom)[1]
    if name == "reduce_sum" and tuple(view.params(atom)["axes"]) == (1,):
        (prod,) = view.args(atom)
        if view.op(prod) != "mul":
            return None
        a, b = view.args(prod)
        for oh_side, w_side in ((a, b), (b, a)):
            oh = idioms.one_hot(view, oh_side)
            w_base, dims = idioms.unexpand(view, w_side)
            if oh is not None and oh[1] == num_e and _shape(w_base) == _shape(oh[0]) and dims.get(1) == 1:
                return w_base, oh[0], num_e
        return None
    if name == "dot_general":  # einsum('tk,tke->te', w, one_hot(ids, E))
        eqn = view.producer(atom)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        w, oh_atom = (view.canon(v) for v in eqn.invars)
        (wc, wb), (oc, ob) = (lc, lb), (rc, rb)
        if len(_shape(w)) == 3:
            w, oh_atom, (wc, wb), (oc, ob) = oh_atom, w, (oc, ob), (wc, wb)
        oh = idioms.one_hot(view, oh_atom)
        if oh is None or oh[1] != num_e or len(_shape(w)) != 2:
            return None
        if (tuple(wc), tuple(wb), tuple(oc), tuple(ob)) != ((1,), (0,), (1,), (0,)) or w is not _skip_convert(
            view, w
        ):
            return None
        return (w, oh[0], num_e) if _shape(oh[0]) == _shape(w) else None
    got = idioms.put_along_last_axis(view, atom)
    if got is not None and view.is_nonneg_index(got[0]):
        return got[1], got[0], num_e
    return None


def _proposal(
    view: View,
    anchor: int,
    ffn: ExpertFfn,
    weights: Any,
    ids: Any,
    num_e: int,
    dispatch: str,
    combine_dtype: Any,
) -> Proposal:
    """The fused op for a recognised block; the combine runs in the dtype the program used for it."""
    from moefuse.kernels.moe import MoeParams, moe_ffn

    y = view.jaxpr.eqns[anchor].outvars[0]
    act = {"geglu_tanh": "geglu", "gelu_tanh": "gelu"}.get(ffn.activation, ffn.activation)
    approx = ffn.activation.endswith("_tanh")
    biased = any(b is not None for b in ffn.biases)
    params = MoeParams(
        num_experts=num_e,
        k=_shape(ids)[-1],
        activation=act,
        gelu_approximate=approx,
        has_expert_bias=biased,
        weights_dtype=jnp.dtype(combine_dtype).name,
    )
    gated = ffn.w_up is not None
    inputs = [ffn.x, weights, ids, ffn.w_gate] + ([ffn.w_up] if gated else []) + [ffn.w_down]
    inputs += [b[0] for b in ffn.biases if b is not None]
    n_w = len(inputs) - sum(b is not None for b in ffn.biases)
    perms = (
        _perm(ffn.w_gate_dims, "EDF"),
        _perm(ffn.w_up_dims, "EDF") if gated else None,
        _perm(ffn.w_down_dims, "EFD"),
    )

    def emit(kernel: str, x: Any, w: Any, i: Any, wg: Any, *rest: Any) -> list[Any]:
        wu, wd = (rest[0], rest[1]) if gated else (None, rest[0])
        b_in, b_down = _bias_args(ffn, list(rest[n_w - 4 :]), x.dtype, _shape(wd)) if biased else (None, None)
        wg = jnp.transpose(_cols(wg, ffn.w_gate_dims, ffn.gate_cols), perms[0])
        wu = None if wu is None else jnp.transpose(_cols(wu, ffn.w_up_dims, ffn.up_cols), perms[1])
        wd = jnp.transpose(wd, perms[2])
        tokens = x.shape[:-1]  # several token dims ([B, S, D]) run as [B * S, D]
        x, w, i = x.reshape(-1, x.shape[-1]), w.reshape(-1, w.shape[-1]), i.reshape(-1, i.shape[-1])
        w_in = wg if wu is None else (wg, wu)
        out = moe_ffn(x, w, i, w_in, wd, params, b_in=b_in, b_down=b_down, impl=kernel)
        return [out.reshape(*tokens, out.shape[-1]).astype(y.aval.dtype)]

    described = {key: val for key, val in params.describe().items() if _relevant(params, key)}
    described["dispatch"] = dispatch
    return Proposal(op=OP, anchor=anchor, inputs=inputs, outputs=[y], params=described, emit=emit)


def _bias_args(ffn: ExpertFfn, given: list[Any], dtype: Any, wd_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """(b_in, b_down) in the kernel's layout ([E, F] each, [E, D]); zeros where the program has none."""
    e, f, d = (
        wd_shape[ffn.w_down_dims.index("E")],
        wd_shape[ffn.w_down_dims.index("F")],
        wd_shape[ffn.w_down_dims.index("D")],
    )
    out = []
    for b, want, shape in zip(ffn.biases, ("EF", "EF", "ED"), ((e, f), (e, f), (e, d)), strict=True):
        if b is None:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append(jnp.transpose(given.pop(0), tuple(b[1].index(c) for c in want)))
    b_gate, b_up, b_down = out
    return (b_gate if ffn.w_up is None else (b_gate, b_up)), b_down


def _relevant(params: Any, key: str) -> bool:
    """Whether a MoeParams field matters for this op (the Plan shows only those)."""
    if key in ("swiglu_alpha", "swiglu_limit"):
        return params.activation == "swiglu_oai"
    if key == "gelu_approximate":
        return params.activation in ("gelu", "geglu")
    if key == "gate_up_layout":
        return params.fused_gate_up
    if key in ("capacity_order", "capacity_groups"):
        return params.capacity is not None
    return True


def _cols(w: Any, dims: tuple[str, ...], cols: tuple[int, int] | None) -> Any:
    """The F columns `cols` of a fused gate/up weight (all of w when cols is None)."""
    return w if cols is None else lax.slice_in_dim(w, cols[0], cols[1], axis=dims.index("F"))


def _perm(dims: tuple[str, ...], want: str) -> tuple[int, ...]:
    return tuple(dims.index(c) for c in want)
