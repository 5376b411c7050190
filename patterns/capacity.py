"""Capacity dispatch (GShard / Switch / MaxText): token-dropping MoE blocks, fused into `moe`.

The block builds per-expert buffers of C slots: each assignment (token t, choice j) gets a position
among the assignments to its expert (a cumsum of a one-hot mask over the token axis, per token
group), is dropped when the position is >= C, and is scattered into slot (e, position) by a
[..., S, E, C] dispatch tensor; the expert FFN runs on the [E, ..., C, D] buffers and a combine
tensor (router weight times dispatch) gathers the results back::

    mask = jax.nn.one_hot(ids, E)                                   # [T, E]  (ids = top-1 choice)
    pos = jnp.cumsum(mask, axis=0) * mask - 1                       # position, -1 elsewhere
    dispatch = jax.nn.one_hot(pos, C) * (mask * (pos < C))[..., None]   # [T, E, C]
    combine = dispatch * gate[:, None, None]
    h = jax.nn.relu(jnp.einsum("ecd,edf->ecf", jnp.einsum("tec,td->ecd", dispatch, x), wi))
    y = jnp.einsum("tec,ecd->td", combine, jnp.einsum("ecf,efd->ecd", h, wo))
    # -> moe(x, gate, ids, wi, wo) with capacity=C, capacity_groups=1

How it is proven: an abstract interpreter reads the mask arithmetic (one_hot, cumsum, +/- and
comparisons with constants, products, sums over E / tokens / k, one_hot of positions, where)
and tracks, for every value, what it holds at an assignment's own expert ("on") and at the
other experts ("off"): a position `p + delta` in a priority order, the keep bit `p < C`, the slot
indicator `p == c`, counts of earlier choices, or a constant. The block fuses only when the
combine is exactly `sum_j w_j * [ids_j == e] * [p_j == c < C]` with w_j the router's weight of
choice j, the dispatch its support, and p_j the kernel's position (token-major for a cumsum over
flattened (tokens, k); slot-major when choice j's cumsum is offset by the counts of choices < j).
Slots may also come from `one_hot(sum(position * keep, E), C)` (the kept position, 0 where dropped)
as long as a keep bit masks the dropped assignments out of slot 0 again, or from
`one_hot(kept position + 1, C + 1)[..., 1:]` (MaxText: dropped ones land in the slot cut off);
a sum over k stands for the one choice routed to each expert only when the ids are a top_k's
(distinct per token) and every choice's value is 0 at its other experts; a router weight computed
with masks (`sum(scores * one_hot(ids), -1)`, `scores * (1 - mask_1)`) is an opaque per-token weight,
passed to the kernel as the program computes it. Anything else (`<=` off by one, counts over the
wrong groups, positions per choice without the earlier choices' counts, dropped assignments left in
slot 0, weights from another choice) declines with the reason.

Modules: `capacity_masks` is the abstract interpreter, `capacity_buffers` recognises the expert FFN
on the buffers; this one finds the block, checks the interpreted combine / dispatch against the
kernel's drop rule and builds the fused `moe` proposal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from moefuse import idioms
from moefuse.match import NoMatch, Proposal
from moefuse.patterns.activations import kernel_activation
from moefuse.patterns.capacity_buffers import Ffn, expert_outputs
from moefuse.patterns.capacity_masks import (
    ZERO,
    Ctx,
    Reject,
    Val,
    describe,
    interpret,
    shape,
    slot_shift,
    token_labels,
)
from moefuse.patterns.dots import dot_labels
from moefuse.patterns.moe_block import plan_params
from moefuse.patterns.precision import FfnValues, ffn_precision
from moefuse.view import View

OP = "moe"
SUPPORTED = (
    (
        OP,
        "capacity dispatch (token dropping)",
        "GShard top-2 (per-choice exclusive cumsum + earlier choices' kept counts, `combine.astype(bool)` "
        "dispatch), MaxText (cumsum over flattened (s, k), `<= C`, `[B,S,E,C]` einsums; also top-k weights "
        "scattered to `[B,S,E]` and slots `one_hot(pos + 1, C + 1)[..., 1:]`), Switch "
        "(`one_hot(cumsum * mask - 1, C)`); experts `einsum('...ec,...d->ec...d')` then batched per-expert "
        "matmuls",
        "num_experts, k, activation, capacity, capacity_order, capacity_groups",
    ),
)


class CapacityPattern:
    op = OP

    def anchors(self, view: View) -> Iterable[int]:
        out = []
        for i, e in enumerate(view.jaxpr.eqns):
            if e.primitive.name == "dot_general":
                (lc, rc), _ = e.params["dimension_numbers"]
                if len(lc) == 2:
                    out.append(i)
        return out

    def match(self, view: View, anchor: int) -> Proposal | NoMatch:
        try:
            return _match(view, anchor)
        except Reject as r:
            return NoMatch(anchor, f"capacity dispatch not fused: {r}", OP)


CAPACITY = CapacityPattern()


def _match(view: View, anchor: int) -> Proposal | NoMatch:
    eqn = view.jaxpr.eqns[anchor]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (view.canon(v) for v in eqn.invars)
    for comb, eo, cc, oc, cb, ob in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        for num_e in sorted({shape(eo)[i] for i in oc}):
            ffn = expert_outputs(view, eo, num_e)
            if ffn is not None:
                return _prove(view, anchor, eqn, ffn, num_e, comb, cc, oc, cb, ob)
    return NoMatch(anchor, "not a combine of per-expert capacity buffers", OP)


def _prove(view: View, anchor: int, eqn: Any, ffn: Ffn, num_e: int, comb: Any, cc, oc, cb, ob) -> Proposal:
    x = ffn.x
    tok = shape(x)[:-1]
    nt = len(tok)
    ctx = Ctx(tok=tok, num_e=num_e)
    # the final einsum: y[tokens, D] = sum_{e, c} combine[tokens, e, c] * out[e, groups, c, D]
    o_lab = ffn.labels
    if sorted(o_lab) != sorted(["E", "C", "D"] + [f"t{i}" for i in range(nt - 1)]):
        raise Reject("the expert buffers are not laid out as [E, groups, C, D]")
    if sorted(o_lab[i] for i in oc) != ["C", "E"]:
        raise Reject("the combine does not sum the expert buffers over (expert, slot)")
    cv = interpret(view, comb, ctx)
    if cv is None:
        raise Reject("the combine tensor is not built from the router's weights and one-hot masks")
    _unshifted(cv)
    c_lab = cv.labels
    if [c_lab[i] for i in cc] != [o_lab[i] for i in oc] or [c_lab[i] for i in cb] != [o_lab[i] for i in ob]:
        raise Reject("the combine einsum pairs combine and buffer dims differently")
    if [c_lab[i] for i in cb] != [f"t{i}" for i in range(nt - 1)]:
        raise Reject("the combine einsum does not batch the token groups")
    y_lab = dot_labels(c_lab, o_lab, cc, oc, cb, ob)
    if tuple(y_lab) != token_labels(ctx) + ("D",):
        raise Reject("the block output is not laid out as [tokens..., D] like its input")
    # the dispatch tensor that built the buffers
    d_atom = ffn.dispatch
    if tuple(ffn.d_labels[:nt]) != token_labels(ctx):
        raise Reject("the dispatch einsum does not gather tokens by the last token axis per group")
    support = _support_of(view, d_atom, comb)
    if support:
        dv = None
    else:
        dv = interpret(view, d_atom, ctx)
        if dv is None:
            raise Reject("the dispatch tensor is not built from the one-hot masks")
        _unshifted(dv)
        if dv.labels != ffn.d_labels:
            raise Reject("the dispatch tensor's dims are not the combine's")
    if c_lab != ffn.d_labels and tuple(sorted(c_lab, key=str)) != tuple(sorted(ffn.d_labels, key=str)):
        raise Reject("dispatch and combine have different dims")
    slots, order = _slots(ctx)
    terms = _terms(cv, slots, weighted=True)
    if dv is not None:
        dterms = _terms(dv, slots, weighted=False)
        if [f for f, _ in dterms] != [f for f, _ in terms]:
            raise Reject("dispatch and combine cover different choices")
    cap = _capacity(ctx)
    weights = []
    for fam, w in terms:
        w_atom, w_lab = w
        weights.append(_router_weight(view, w_atom, w_lab, fam, ctx))
    k = sum(1 if ctx.ids_fams[f] == "slot" else shape(f)[-1] for f in slots)
    groups = math.prod(tok[:-1])
    combine_dtype = comb.aval.dtype
    if ffn.x.aval.dtype != eqn.outvars[0].aval.dtype:
        raise Reject("the block output dtype differs from the tokens' dtype")
    for w in (ffn.w_gate, ffn.w_up, ffn.w_down):
        if w is not None and w.aval.dtype != x.aval.dtype:
            raise Reject("expert weights and tokens have different dtypes (mixed-precision FFN)")
    return _proposal(view, anchor, ffn, slots, weights, k, num_e, cap, order, groups, combine_dtype, ctx)


def _unshifted(v: Val) -> None:
    """Reject slots taken from a one_hot of position + d whose first d slots are never cut off."""
    d = slot_shift(v.labels)
    if d is not None:
        raise Reject(
            f"one_hot over capacity of a position off by {d:g}, its first {d:g} slot(s) never sliced off"
        )


def _support_of(view: View, d: Any, comb: Any) -> bool:
    """Whether d == (comb != 0) (GShard's / MaxText's `combine.astype(bool)`), or that cast to a number."""
    d = view.canon(d)
    while d.aval.dtype != np.bool_ and view.op(d) == "convert_element_type":
        d = view.args(d)[0]  # a number cast from the 0 / 1 support below, exactly
    if d.aval.dtype != np.bool_:
        return False
    if view.op(d) == "convert_element_type":
        return view.same(view.args(d)[0], comb)
    if view.op(d) == "ne":
        a, b = view.args(d)
        return view.scalar(b) == 0 and view.same(a, comb)
    return False


def _slots(ctx: Ctx) -> tuple[list, str]:
    fams = list(ctx.ids_fams)
    if not fams:
        raise Reject("no one-hot expert mask of the router's ids")
    kinds = {ctx.ids_fams[f] for f in fams}
    if kinds == {"k"}:
        if len(fams) != 1:
            raise Reject("masks of two different [.., k] id arrays")
        f = fams[0]
        if shape(f)[-1] > 1 and ctx.orders != {"token_major"}:
            raise Reject("positions of all k choices not counted in one order")
        return fams, "token_major" if shape(f)[-1] > 1 else "slot_major"
    if kinds != {"slot"}:
        raise Reject("masks of per-choice ids mixed with [.., k] ids")
    if ctx.orders - {"slot_major"}:
        raise Reject("per-choice masks counted token-major")
    # slot-major: choice i is offset by exactly the counts of choices 0..i-1
    order = []
    remaining = set(fams)
    while remaining:
        nxt = [f for f in remaining if ctx.before.get(f, frozenset()) == frozenset(order)]
        if len(nxt) != 1:
            raise Reject(
                "the choices' positions are not offset by exactly the earlier choices' counts "
                "(slot-major order not provable)"
            )
        order.append(nxt[0])
        remaining.discard(nxt[0])
    if ctx.first - {order[0]}:
        raise Reject("a later choice's positions are used without the earlier choices' counts")
    return order, "slot_major"


def _terms(v: Val, slots: list, weighted: bool) -> list:
    """[(fam, weight)] of a combine (weighted) / dispatch: sum over choices of w * [slot indicator]."""
    terms = v.terms if v.kind == "sum" else (v,)
    out = []
    for t in terms:
        what = "combine" if weighted else "dispatch"
        if t.kind != "m" or t.on != ("d",) or t.off != ZERO or "C" not in t.labels or "E" not in t.labels:
            raise Reject(
                f"the {what} tensor is not `[ids == e] * [position == c]` for kept assignments "
                f"(it holds {describe(t.on)} at the assignment's expert)"
            )
        if weighted and len(t.weights) != 1:
            raise Reject(f"the combine tensor has {len(t.weights)} weight factors per assignment, not 1")
        if not weighted and t.weights:
            raise Reject("the dispatch tensor is weighted")
        if "K" in t.labels:
            raise Reject(f"the {what} tensor keeps the k axis")
        if slots and ("k" if t.ksum else "slot") != ("k" if _is_k(t, slots) else "slot"):
            raise Reject(f"the {what} tensor does not sum over all k choices")
        out.append((t.fam, t.weights[0] if weighted else None))
    fams = [f for f, _ in out]
    if sorted(map(id, fams)) != sorted(map(id, slots)):
        raise Reject("the combine does not cover every choice exactly once")
    order = {id(f): i for i, f in enumerate(slots)}
    return sorted(out, key=lambda fw: order[id(fw[0])])


def _is_k(t: Val, slots: list) -> bool:
    return len(slots) == 1 and len(shape(slots[0])) > 0 and t.ksum


def _capacity(ctx: Ctx) -> int:
    if len(ctx.cdims) != 1:
        raise Reject("no single capacity dimension")
    (cdim,) = ctx.cdims
    if ctx.caps and ctx.caps != {cdim}:
        got = ", ".join(f"{c:g}" for c in sorted(ctx.caps))
        raise Reject(
            f"assignments are kept while position < {got}, but the buffers have {cdim} slots "
            "(an off-by-one `<=` or a capacity from another group size)"
        )
    for z in ctx.outside:
        if 0 <= z < cdim:
            raise Reject(f"dropped assignments are sent to slot {z:g} of the buffers")
    return int(cdim)


def _router_weight(view: View, w: Any, w_lab: tuple, fam: Any, ctx: Ctx) -> Any:
    """The weight var of choice `fam` (as the kernel takes it), proven to be the router's weight."""
    want = token_labels(ctx) + (("K",) if ctx.ids_fams[fam] == "k" else ())
    if tuple(w_lab) != want:
        raise Reject("the combine weights are not laid out per token and choice")
    if not _tied(view, w, fam, ctx, 8):
        raise Reject("the combine weights are not the router's weights of the same choice")
    return w


def _tied(view: View, w: Any, fam: Any, ctx: Ctx, depth: int) -> bool:
    """w is derived from the value the router selected for the ids `fam` (renorm / scale allowed)."""
    w = view.canon(w)
    if depth == 0:
        return False
    if _paired(view, w, fam):
        return True
    ew, ef = view.producer(w), view.producer(fam)
    if (
        ew is not None
        and ef is not None
        and ew.primitive.name in ("squeeze", "slice")
        and ew.primitive.name == ef.primitive.name
        and dict(ew.params) == dict(ef.params)
    ):  # column j of the router's [.., k] weights and of its ids
        return _tied(view, ew.invars[0], view.canon(ef.invars[0]), ctx, depth - 1)
    k_fam = len(shape(fam)) == ctx.nt + 1
    sm = idioms.softmax(view, w)
    if sm is not None and k_fam and sm.axis == len(shape(w)) - 1:
        return _tied(view, sm.operand, fam, ctx, depth - 1)  # softmax over the k selected logits
    name = view.op(w)
    args = view.args(w)
    if name == "convert_element_type":
        return _tied(view, args[0], fam, ctx, depth - 1)
    if name == "div":
        num, den = args
        return _per_token(view, den, w, k_fam) and _tied(view, num, fam, ctx, depth - 1)
    if name == "mul":
        a, b = args
        for x, y in ((a, b), (b, a)):
            if view.scalar(y) is not None and _tied(view, x, fam, ctx, depth - 1):
                return True
            yv = interpret(view, y, ctx)
            if yv is not None and yv.on == ("k",) and yv.fam is fam and _tied(view, x, fam, ctx, depth - 1):
                return True
        return False
    if name == "reduce_sum" and not k_fam:  # sum(scores * one_hot(ids), -1)
        (prod,) = args
        if tuple(view.params(w)["axes"]) != (len(shape(prod)) - 1,) or view.op(prod) != "mul":
            return False
        for side in view.args(prod):
            oh = idioms.one_hot(view, side)
            if oh is not None and view.canon(oh[0]) is fam and oh[1] == ctx.num_e:
                return True
        return False
    ta = idioms.take_along_axis(view, w)
    return ta is not None and view.canon(ta[1]) is fam


def _per_token(view: View, den: Any, w: Any, k_fam: bool) -> bool:
    """den is the same for every choice of a token (a renormalisation's denominator)."""
    if not k_fam:
        return shape(view.canon(den)) in (shape(w), ())  # one choice per array: any per-token value
    _, dims = idioms.unexpand(view, den)
    return len(shape(w)) - 1 not in dims.values()


def _paired(view: View, w: Any, ids: Any) -> bool:
    """w and ids are the values and indices of one top_k (through the same slices / squeezes)."""
    w, ids = view.canon(w), view.canon(ids)
    ew, ei = view.producer(w), view.producer(ids)
    if ew is None or ei is None:
        return False
    if ew is ei and ew.primitive.name == "top_k":
        return view.out_index(w) == 0 and view.out_index(ids) == 1
    if ew.primitive.name != ei.primitive.name or ew.primitive.name not in ("squeeze", "slice", "reshape"):
        return False
    if dict(ew.params) != dict(ei.params):
        return False
    return _paired(view, ew.invars[0], ei.invars[0])


def _proposal(view, anchor, ffn: Ffn, slots, weights, k, num_e, cap, order, groups, combine_dtype, ctx):
    from moefuse.kernels.moe import MoeParams, moe_ffn

    y = view.jaxpr.eqns[anchor].outvars[0]
    gated = ffn.w_up is not None
    n_s = len(slots)
    masks = list(dict.fromkeys(view.canon(m) for m in ctx.masks))
    expert_weights = [ffn.w_gate] + ([ffn.w_up] if gated else []) + [ffn.w_down]
    inputs = [ffn.x, *weights, *slots, *expert_weights, *masks]
    prec = ffn_precision(view, FfnValues(ffn.x, [[w] for w in expert_weights], inputs, weights, y,
                                         combine_dtype))
    if isinstance(prec, str):
        return NoMatch(anchor, prec, OP)
    params = MoeParams(
        num_experts=num_e,
        k=k,
        **kernel_activation(ffn.activation),
        capacity=cap,
        capacity_order=order,
        capacity_groups=groups,
        weights_dtype=jnp.dtype(combine_dtype).name,
        compute_dtype=prec.compute_dtype,
        projection_dtype=prec.projection_dtype,
        activation_dtype=prec.activation_dtype,
        out_dtype=prec.out_dtype,
        hidden_dtype=prec.hidden_dtype,
    )
    perms = (
        tuple(ffn.w_gate_dims.index(c) for c in "EDF"),
        tuple(ffn.w_up_dims.index(c) for c in "EDF") if gated else None,
        tuple(ffn.w_down_dims.index(c) for c in "EFD"),
    )
    per_slot = ctx.ids_fams[slots[0]] == "slot"
    wdt = jnp.dtype(combine_dtype)

    def emit(kernel: str, x: Any, *rest: Any) -> list[Any]:
        ws, ids = rest[:n_s], rest[n_s : 2 * n_s]
        wg = rest[2 * n_s]
        wu = rest[2 * n_s + 1] if gated else None
        wd = rest[2 * n_s + (2 if gated else 1)]
        if per_slot:
            w = jnp.stack([a.astype(wdt) for a in ws], axis=-1)
            i = jnp.stack([a.astype(jnp.int32) for a in ids], axis=-1)
        else:
            w, i = ws[0].astype(wdt), ids[0].astype(jnp.int32)
        tokens = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        w, i = w.reshape(-1, k), i.reshape(-1, k)
        w_in = jnp.transpose(wg, perms[0])
        if gated:
            w_in = (w_in, jnp.transpose(wu, perms[1]))
        out = moe_ffn(x2, w, i, w_in, jnp.transpose(wd, perms[2]), params, impl=kernel)
        return [out.reshape(*tokens, out.shape[-1]).astype(y.aval.dtype)]

    described = plan_params(params, "capacity")
    return Proposal(op=OP, anchor=anchor, inputs=inputs, outputs=[y], params=described, emit=emit)
