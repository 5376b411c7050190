"""Router pattern: score -> (group-limited) top-k -> weights, fused into `route`.

Anchors on `top_k` over the last axis (or the slice `[..., :k]` of a stable `argsort(-p)` or
`argsort(p, descending=True)`) and reads backwards (what was selected on) and forwards (how the
weights were made). Recognised families:

  1. softmax -> top-k (-> renormalise)                   Mixtral, Qwen3-MoE, Switch
  2. top-k on logits -> softmax over the k               Gemma-style, GPT-OSS
  3. sigmoid (+ selection-only bias) -> top-k -> gather scores -> renorm -> x scale   DeepSeek-V3
  4. 3 with group-limited selection (top-2-sum or max group score)   DeepSeek-V3, Ling-2.6
  5. x per-expert scale gathered by id (Gemma4); router bias on the logits
  6. top-k on logits -> sigmoid (or softmax) of the chosen logits, laid out as a dense [.., E] matrix
     by a mask of the ids (`where(mask, sigmoid(logits), 0)`, `softmax(where(mask, logits, -inf))`)  Llama4

The logits come from anywhere (a gate matmul, a `shard_map` input, a temperature division, a cast);
only a product of two activations of the same tokens (attention, token similarity) is not a router.

Example::

    def router(x, w, b):
        s = jax.nn.sigmoid(x @ w)
        _, ids = jax.lax.top_k(s + b, 8)
        wts = jnp.take_along_axis(s, ids, -1)
        return wts / wts.sum(-1, keepdims=True) * 2.5, ids
    moefuse.plan(router, x, w, b).fused[0].params["score"]   # "sigmoid"
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp

from moefuse import _compat as C
from moefuse import idioms
from moefuse.match import NoMatch, Proposal
from moefuse.view import View

OP = "route"
SUPPORTED = (
    (
        OP,
        "softmax → top-k (→ renorm)",
        "inline / custom_jvp / exp∘log_softmax / exp(x - logsumexp) softmax; `lax.top_k` or stable "
        "`argsort(-p)[:, :k]` / `argsort(p, descending=True)[:, :k]`; `/ sum` (+eps), `/ max(sum, eps)` "
        "or `/ norm(w, 1)` renorm; logits from anywhere",
        "k, num_experts, renorm",
    ),
    (OP, "top-k → softmax over k", "`lax.top_k(logits)` then softmax of the values", "k, num_experts"),
    (
        OP,
        "sigmoid (+bias) → top-k → gather → renorm → ×scale",
        "`logistic` or `1/(1+exp(-x))`; `take_along_axis` / fancy-index gather; "
        "bias added for selection only",
        "k, selection_bias, post steps",
    ),
    (
        OP,
        "group-limited selection",
        "group score top-2 sum (`top_k`, two columns, the last two of `jnp.sort`, or max + max of the rest; "
        "for groups of two experts also their plain or sorted sum) or max; mask by scatter / one_hot sum "
        "(clipped or not); `where` / masked fill",
        "n_group, topk_group, group_score, group_fill",
    ),
    (OP, "× per-expert scale by id", "`scale[ids]` / `jnp.take`", "expert_scale"),
    (
        OP,
        "top-k → sigmoid or softmax, laid out densely",
        "`_, ids = lax.top_k(logits)`; `where(mask, sigmoid(logits), 0)` with the mask true exactly at the "
        "ids (a scatter of True, a one-hot sum); the softmax over the chosen logits as "
        "`softmax(where(mask, logits, -inf))` or `where(mask, softmax(logits), 0)` renormalised over E; "
        "a top-k of such a masked matrix taken as given in a body",
        "k, num_experts",
    ),
)


def max_experts() -> int:
    """Largest expert count treated as a router (larger top-k is vocabulary sampling)."""
    return int(os.environ.get("MOEFUSE_MAX_EXPERTS", "2048"))


@dataclasses.dataclass
class _Found:
    """What the backward/forward reading bound, before building the proposal."""

    logits: Any
    scores: Any  # s: score(logits); equal to logits for score "none"
    score: str
    order: str
    bias: Any = None
    group: tuple[int, int, str, float] | None = None  # n_group, topk_group, group_score, fill
    weights: Any = None  # var holding the raw k weights (before post steps)
    weights_from: str = "selection"
    post: list[tuple] = dataclasses.field(default_factory=list)
    expert_scale: Any = None
    out_weights: Any = None
    selection: _Selection | None = None
    notes: tuple[str, ...] = ()
    dense_out: Any = None  # the [.., E] matrix the weights are laid out into (0 off the ids), or None


class RouterPattern:
    op = OP

    def anchors(self, view: View) -> Iterable[int]:
        eqns = view.jaxpr.eqns
        return [i for i, e in enumerate(eqns) if e.primitive.name == "top_k" or _argsort_top_k(view, e)]

    def match(self, view: View, anchor: int) -> Proposal | NoMatch:
        try:
            found = _read_router(view, anchor)
        except _Reject as r:
            return NoMatch(anchor, str(r), OP)
        return _proposal(view, anchor, found, expose=False)


ROUTER = RouterPattern()


class _Reject(Exception):
    pass


def _shape(atom: Any) -> tuple[int, ...]:
    return tuple(atom.aval.shape)


def _size(atom: Any) -> int:
    return math.prod(_shape(atom))


@dataclasses.dataclass(frozen=True)
class _Selection:
    """The anchor's top-k: what it selects on, its values (None for argsort), its ids and k."""

    scores: Any
    vals: Any
    ids: Any
    k: int
    by_sort: bool = False


def _argsort_top_k(view: View, eqn: C.JaxprEqn) -> _Selection | None:
    """eqn = perm[..., :k] of perm = `argsort(-p)` or `argsort(p, descending=True)`, a stable sort along
    the last axis: the ids of lax.top_k(p, k), ties to the lower index, as a stable sort keeps them (NaN
    and signed zeros aside: see _read_router). The anchor is this slice (the user's line)."""
    if eqn.primitive.name != "slice" or len(eqn.invars) != 1:
        return None
    sliced = view.canon(eqn.invars[0])
    got = idioms.argsort(view, sliced)
    if got is not None and view.op(got[0]) == "neg":
        scores, chain = view.args(got[0])[0], [sliced]
    else:  # jnp's descending argsort: the sort's payload reversed back
        got = idioms.descending_argsort(view, sliced)
        if got is None:
            return None
        scores, chain = got[0], [view.canon(view.producer(sliced).invars[0]), sliced]
    perm = chain[0]  # the sort's payload: each step to the slice read by the next one only
    if got[1] != len(_shape(perm)) - 1 or _used(view, view.producer(perm).outvars[0]):
        return None
    if any(len(view.users(v)) != 1 or view.is_output(v) for v in chain):
        return None
    shape = _shape(perm)
    want = [(0, n) for n in shape[:-1]]
    bounds = list(zip(eqn.params["start_indices"], eqn.params["limit_indices"]))
    if any(st != 1 for st in eqn.params.get("strides") or ()) or bounds[:-1] != want or bounds[-1][0]:
        return None
    return _Selection(scores, None, eqn.outvars[0], bounds[-1][1], by_sort=True)


def _selection(view: View, anchor: int) -> _Selection:
    eqn = view.jaxpr.eqns[anchor]
    if eqn.primitive.name == "slice":
        return _argsort_top_k(view, eqn)
    rank = len(_shape(eqn.invars[0]))
    axis = eqn.params.get("axis", rank - 1)
    if axis not in (rank - 1, -1):
        raise _Reject(f"top_k over axis {axis}, not the last (expert) axis")
    return _Selection(eqn.invars[0], eqn.outvars[0], eqn.outvars[1], eqn.params["k"])


def _read_router(view: View, anchor: int) -> _Found:
    pick = _selection(view, anchor)
    sel_in, vals, ids, k = pick.scores, pick.vals, pick.ids, pick.k
    num_e = _shape(sel_in)[-1]
    if num_e > max_experts():
        raise _Reject(
            f"top-{k} over {num_e} candidates: more than any MoE router "
            f"(limit {max_experts()}, MOEFUSE_MAX_EXPERTS); looks like vocabulary sampling"
        )
    if k == num_e > 1 and not _indexes_more_than(view, ids, num_e, sel_in):
        raise _Reject(f"top-{k} of {num_e} candidates keeps them all: a sort, not a choice of experts")
    if C.is_dropvar(ids) or not (view.users(ids) or view.is_output(ids)):
        raise _Reject("the top-k indices are unused: no routing decision")

    sel = view.canon(sel_in, through_stop_gradient=not _used(view, vals))
    group = _group_limited(view, sel)
    if group is not None:
        sel, group = group[0], group[1:]
    bias = None
    base = sel
    if view.op(sel) == "add":
        a, b = view.args(sel)
        for s_side, b_side in ((a, b), (b, a)):
            vec = _row_vector(view, b_side, num_e)
            scored = idioms.softmax(view, s_side) is not None or idioms.sigmoid(view, s_side) is not None
            if vec is not None and scored:  # a bias on raw logits is part of the logits
                base, bias = s_side, vec
                break
    if (sm := idioms.softmax(view, base)) is not None:
        if sm.axis != len(_shape(base)) - 1:
            raise _Reject(f"softmax over axis {sm.axis}, not the expert axis")
        found = _Found(logits=sm.operand, scores=base, score="softmax", order="score_then_topk")
    elif (x := idioms.sigmoid(view, base)) is not None:
        found = _Found(logits=x, scores=base, score="sigmoid", order="score_then_topk")
    elif view.op(base) == "transpose" and idioms.softmax(view, view.args(base)[0]) is not None:
        raise _Reject(
            "the top-k runs along an axis the softmax did not normalise (a transposed softmax: "
            "expert-choice routing picks tokens per expert)"
        )
    else:
        found = _Found(logits=base, scores=base, score="none", order="score_then_topk")
    found.bias, found.group, found.selection = bias, group, pick
    if pick.by_sort and (found.score != "softmax" or bias is not None or group is not None):
        raise _Reject(
            "top-k spelled as an argsort: a sort ranks NaNs and the two zeros unlike top_k (which puts "
            "+0 before -0 and -NaN last), so ids are the same only for softmax scores (never -0, a row "
            "NaN everywhere or nowhere)"
        )
    _check_logits(view, found.logits)
    _read_weights(view, found, vals, ids)
    if found.dense_out is None:  # (a dense layout is all there is: no [.., k] weights to post-process)
        _read_post(view, found, ids, num_e)
    _check_scored(view, found)
    return found


def _used(view: View, var: Any) -> bool:
    return var is not None and not C.is_dropvar(var) and bool(view.users(var) or view.is_output(var))


def _row_vector(view: View, atom: Any, n: int) -> Any | None:
    """The [n] vector v if atom is v broadcast along the last axis, else None."""
    base, dims = idioms.unexpand(view, atom)
    if _shape(base) == (n,) and dims.get(0) == len(_shape(atom)) - 1:
        return base
    return None


# Ops through which a gate weight keeps being a weight (layout, precision, a slice of stacked layers).
_WEIGHT_LAYOUT_OPS = frozenset(
    {"convert_element_type", "transpose", "reshape", "broadcast_in_dim", "squeeze", "expand_dims", "slice"}
    | {"dynamic_slice", "rev", "copy"}
)


def _weight_like(view: View, atom: Any, depth: int = 8) -> bool:
    """Whether atom is a weight as it arrived (an input or constant, re-laid-out, sliced or rescaled),
    not a value computed from activations (a projection, an exp, ...)."""
    name = view.op(atom)
    if name in ("input", "const", "literal") or view.value(atom) is not None:
        return True
    if depth == 0:
        return False
    if name in _WEIGHT_LAYOUT_OPS:
        return _weight_like(view, view.args(atom)[0], depth - 1)
    if name in ("mul", "div"):  # a dequantised weight: w * scale
        return all(_weight_like(view, v, depth - 1) for v in view.args(atom))
    return False


def _unlaid(view: View, atom: Any) -> Any:
    """atom with layout ops (transpose, reshape, cast, ...) stripped."""
    while view.op(atom) in _WEIGHT_LAYOUT_OPS:
        atom = view.args(atom)[0]
    return view.canon(atom)


def _check_logits(view: View, logits: Any) -> None:
    """The logits may come from anywhere (a gate matmul, a `shard_map` input, a temperature division, a
    reshape, a cast), but not from a product of two activations: candidates computed from the tokens
    themselves (attention scores over keys, similarities between tokens) are not a fixed set of experts."""
    x = logits
    for _ in range(8):
        name = view.op(x)
        if name in _WEIGHT_LAYOUT_OPS:
            x = view.args(x)[0]
        elif name == "add":  # a logit bias
            a, b = view.args(x)
            x = a if len(_shape(b)) <= len(_shape(a)) else b
        elif name in ("mul", "div"):  # a temperature, a scale: follow the full-size operand
            x = max(view.args(x), key=lambda v: (_size(v), not _weight_like(view, v)))
        else:
            break
    eqn = view.producer(x)
    if eqn is None or eqn.primitive.name != "dot_general":
        return
    (_, _), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        raise _Reject(
            "the logits are a batched product (each batch element has its own candidates, as attention "
            "scores over keys do), not tokens times one set of expert weights"
        )
    lhs, rhs = (_unlaid(view, v) for v in eqn.invars)
    if view.same(lhs, rhs) or not any(_weight_like(view, v) for v in eqn.invars):
        raise _Reject(
            "the logits are a product of two activations of the same tokens (attention-like scores), "
            "not tokens times expert weights"
        )


_SOFTMAX_ROOTS = frozenset({"div", "exp"}) | C.CUSTOM_JVP_NAMES


# Ops that carry the ids on to a gather's indices (ids[..., None], the old concat([iota, ids]) spelling)
_INDEX_LAYOUT_OPS = frozenset(
    {"broadcast_in_dim", "reshape", "concatenate", "convert_element_type", "squeeze"}
)


def _near_users(view: View, var: Any, through: frozenset[str] | None, depth: int) -> list[C.JaxprEqn]:
    """Equations reached from var's users in at most `depth` steps, stepping on only through
    equations named in `through` (any equation when None). Bounded by depth and fan-out, not by
    the size of the program, so reading one router costs the same in a 1- or an 80-layer model."""
    found: list[C.JaxprEqn] = []
    seen: set[int] = set()
    frontier = [var]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for u in view.users(v):
                if id(u) in seen:
                    continue
                seen.add(id(u))
                found.append(u)
                if through is None or u.primitive.name in through:
                    nxt.extend(o for o in u.outvars if not C.is_dropvar(o))
        frontier = nxt
    return found


def _indexes_more_than(view: View, ids: Any, n: int, ranked: Any) -> bool:
    """Whether the ids index a table longer than the n candidates they rank: a gather from, or a
    scatter into, an array with more than n entries along the indexed dim that is not computed from
    what was ranked (expert weights gathered at the ids, tokens counted per expert into zeros). A top-k
    of all its candidates is then still a choice of n experts out of more, not a ranking of everything
    there is. Rows of the ranked data itself (activations indexed by the ranks) are no such table."""
    for eqn in _near_users(view, ids, _INDEX_LAYOUT_OPS, depth=8):
        name = eqn.primitive.name
        if name == "gather":
            dims = eqn.params["dimension_numbers"].start_index_map
        elif name.startswith("scatter"):
            dims = eqn.params["dimension_numbers"].scatter_dims_to_operand_dims
        else:
            continue
        table = eqn.invars[0]
        if any(_shape(table)[d] > n for d in dims) and not _shares_inputs(view, table, ranked):
            return True
    return False


def _shares_inputs(view: View, a: Any, b: Any) -> bool:
    """Whether a and b are both computed from some same input of this level (constants do not count)."""
    return bool(_inputs_of(view, a) & _inputs_of(view, b))


def _inputs_of(view: View, atom: Any) -> set[Any]:
    """The inputs of this level (jaxpr invars) that `atom` is computed from."""
    found: set[Any] = set()
    seen: set[int] = set()
    stack = [atom]
    invars = set(view.jaxpr.invars)
    while stack:
        v = stack.pop()
        if C.is_literal(v):
            continue
        if v in invars:
            found.add(v)
            continue
        i = view.eqn_index(v)
        if i is None or i in seen:
            continue
        seen.add(i)
        stack.extend(view.jaxpr.eqns[i].invars)
    return found


def _read_weights(view: View, f: _Found, vals: Any, ids: Any) -> None:
    near_ids = _near_users(view, ids, _INDEX_LAYOUT_OPS, depth=8)
    gathered = [
        u.outvars[0]
        for u in near_ids
        if u.primitive.name == "gather"
        and (ta := idioms.take_along_axis(view, u.outvars[0])) is not None
        and view.canon(ta[1]) is view.canon(ids)
        and view.canon(ta[0]) is view.canon(f.scores)
    ]
    vals_used = _used(view, vals)
    if f.score == "none" and vals_used and f.bias is None and f.group is None:
        for u in _near_users(view, vals, None, depth=6):
            sm = idioms.softmax(view, u.outvars[0]) if u.primitive.name in _SOFTMAX_ROOTS else None
            if (
                sm is not None
                and view.op(sm.operand) == "convert_element_type"
                and view.canon(view.args(sm.operand)[0]) is view.canon(vals)
            ):
                raise _Reject(
                    "softmax over the top-k values runs in another dtype than the logits "
                    f"({vals.aval.dtype} -> {sm.operand.aval.dtype}); route keeps the logits' dtype"
                )
            if sm is not None and view.canon(sm.operand) is view.canon(vals):
                if sm.axis != len(_shape(vals)) - 1:
                    raise _Reject("softmax over the top-k values is not over the k axis")
                f.order, f.score, f.weights = "topk_then_score", "softmax", view.canon(u.outvars[0])
                return
            if u.primitive.name in ("logistic", "div") and len(u.outvars) == 1:
                x = idioms.sigmoid(view, u.outvars[0])
                if x is not None and view.canon(x) is view.canon(vals):  # Llama4: sigmoid of the top logits
                    f.order, f.score, f.weights = "topk_then_score", "sigmoid", view.canon(u.outvars[0])
                    return
    if f.score == "none" and not vals_used and f.bias is None and f.group is None:
        # sigmoid(logits) gathered at the logits' own top-k ids is sigmoid of the top-k values, exactly
        # (elementwise: sigmoid(l)[ids] == sigmoid(l[ids])): the top-k-then-sigmoid router
        for u in near_ids:
            ta = idioms.take_along_axis(view, u.outvars[0]) if u.primitive.name == "gather" else None
            if ta is None or view.canon(ta[1]) is not view.canon(ids):
                continue
            x = idioms.sigmoid(view, ta[0])
            if x is not None and view.canon(x) is view.canon(f.scores):
                f.order, f.score, f.weights = "topk_then_score", "sigmoid", view.canon(u.outvars[0])
                f.notes += ("the weights are sigmoid(logits) gathered at the ids of the logits' top-k: "
                            "the sigmoid of the top-k values",)
                return
    if not view.is_output(ids):
        for u in near_ids:
            ta = idioms.take_along_axis(view, u.outvars[0]) if u.primitive.name == "gather" else None
            if (
                ta is not None
                and view.canon(ta[1]) is view.canon(ids)
                and view.canon(ta[0]) is not view.canon(f.scores)
                and _shape(ta[0]) == _shape(f.scores)
            ):
                raise _Reject(
                    f"the ids pick entries of another {list(_shape(ta[0]))} distribution "
                    "(distillation or sampling), not experts"
                )
    if vals_used and gathered:
        raise _Reject("both the top-k values and the scores gathered at the ids are used")
    if vals_used:
        if f.bias is not None:
            raise _Reject(
                "the weights are the top-k values of the *biased* scores "
                "(a selection bias is normally left out of the weights)"
            )
        f.weights, f.weights_from = view.canon(vals), "selection"
    elif gathered:
        f.weights, f.weights_from = view.canon(gathered[0]), "scores"
    elif f.score == "none" and f.bias is None and f.group is None and (
        dense := _dense_weights_at(view, ids, f.logits)
    ) is not None:
        f.order, f.score = "topk_then_score", dense[1]
        f.dense_out = dense[0]
        f.notes += (f"the weights are laid out as a dense [.., E] matrix, 0 off the chosen experts "
                    f"({dense[2]}), as the program does",)
    elif _one_hot_gather(view, ids, f.scores):
        raise _Reject(
            "the scores are gathered by a one-hot contraction (sum(one_hot(ids) * s)); "
            "NaN or inf scores of unselected experts would spread there but not in a fused gather"
        )
    else:
        raise _Reject("no routing weights: the top-k values are unused and no scores are gathered at the ids")


def _check_scored(view: View, f: _Found) -> None:
    """A top-k of values that are neither scored (softmax, sigmoid), biased, group-limited nor
    renormalised is a bare top_k, not a router."""
    if f.score != "none" or f.bias is not None or f.group is not None:
        return
    if any(step[0] in ("renorm", "renorm_max") for step in f.post):
        return  # top-k of given probabilities, renormalised: the route op takes them as they are
    if view.op(f.scores) in ("exp", "div", "mul"):
        raise _Reject(
            f"scores come from `{view.op(f.scores)}` in a spelling moefuse does not recognise "
            "as softmax or sigmoid, and the weights are not renormalised"
        )
    if view.op(f.scores) == "input":
        scored = _scored_outside(view, f.scores)
        if scored is None:
            raise _Reject(
                "top-k of an input of this body used as weights as it is (no score function or "
                "renormalisation here, nor where the body's caller computes it): a bare top_k, left as "
                "written"
            )
        f.notes += (f"the scores are a {scored} computed outside this body; the route takes them as given",)
        return
    raise _Reject("top-k of raw logits used as weights without a softmax or a renormalisation: not a router")


def _scored_outside(view: View, atom: Any) -> str | None:
    """ "softmax" / "sigmoid" (with the caller's location) if the body input `atom` is bound, through
    any number of enclosing bodies run once (a shard_map, a jit), to such scores over its last axis,
    or to sigmoid scores kept only at the top-k of their logits (`where(mask, sigmoid(logits), 0)`,
    Llama4: a top-k of that matrix is the routing decision, taken on it as the program does)."""
    got = view.outside(atom)
    while got is not None and got[0].op(got[1]) == "input":
        got = got[0].outside(got[1])
    if got is None:
        return None
    outer, value = got
    sm = idioms.softmax(outer, value)
    masked = idioms.masked_at_choice(outer, value)
    if sm is not None and sm.axis == len(_shape(value)) - 1:
        kind = "softmax"
    elif idioms.sigmoid(outer, value) is not None:
        kind = "sigmoid"
    elif masked is not None and _sigmoid_of_topk_operand(outer, *masked):
        kind = f"sigmoid masked to the top-{_shape(masked[1])[-1]} of its logits"
    else:
        return None
    file, line, _ = C.eqn_location(outer.producer(value))
    return f"{kind} ({C.relpath(file)}:{line})" if line else kind


def _sigmoid_of_topk_operand(view: View, s: Any, ids: Any) -> bool:
    """Whether s is the sigmoid of the values whose top-k made ids."""
    x = idioms.sigmoid(view, s)
    top = view.producer(ids)
    return x is not None and top is not None and view.same(top.invars[0], x)


# Ops between a router's ids and a mask of them (`.at[rows, ids].set(True)`, `one_hot(ids).sum(-2) > 0`)
_MASK_OPS = _INDEX_LAYOUT_OPS | {"scatter", "eq", "reduce_or", "reduce_max", "reduce_sum", "gt", "ne", "not",
                                 "min", "max"}


def _dense_weights_at(view: View, ids: Any, logits: Any) -> tuple[Any, str, str] | None:
    """(M, score, how) if M is the chosen experts' weights laid out densely, 0 off the ids (the top-k of
    logits): `where(mask, sigmoid(logits), 0)` (Llama4: score "sigmoid"), or the softmax over the
    chosen logits (score "softmax") written as `softmax(where(mask, logits, -inf))` over E or as
    `where(mask, softmax(logits), 0)` renormalised over E; the mask true exactly at the ids."""
    for u in _near_users(view, ids, _MASK_OPS, depth=8):
        if u.primitive.name != "select_n" or len(u.outvars) != 1:
            continue
        m = view.canon(u.outvars[0])
        masked = idioms.masked_at_choice(view, m)
        if masked is not None and view.canon(masked[1]) is view.canon(ids):
            x = idioms.sigmoid(view, masked[0])
            if x is not None and view.same(x, logits):
                return m, "sigmoid", "where(mask of the ids, sigmoid(logits), 0)"
            sm = idioms.softmax(view, masked[0])
            if sm is not None and sm.axis == len(_shape(m)) - 1 and view.same(sm.operand, logits):
                for d in view.users(m):  # m / sum(m, -1): the softmax renormalised over the chosen
                    if len(d.outvars) == 1 and idioms.renormalised(view, d.outvars[0]) is m:
                        return view.canon(d.outvars[0]), "softmax", "where(mask, softmax(logits), 0) / sum"
        masked = idioms.masked_at_choice(view, m, fill=float("-inf"))
        if masked is not None and view.canon(masked[1]) is view.canon(ids) and view.same(masked[0], logits):
            for d in _near_users(view, m, None, depth=6):  # softmax(where(mask, logits, -inf)) over E
                sm = idioms.softmax(view, d.outvars[0]) if len(d.outvars) == 1 else None
                if sm is not None and view.canon(sm.operand) is m and sm.axis == len(_shape(m)) - 1:
                    return view.canon(d.outvars[0]), "softmax", "softmax(where(mask, logits, -inf))"
    return None


def _one_hot_gather(view: View, ids: Any, scores: Any) -> bool:
    """Whether some sum(one_hot(ids) * scores, -1) reads the ids."""
    for u in _near_users(view, ids, _INDEX_LAYOUT_OPS | {"eq"}, depth=8):
        if u.primitive.name != "mul":
            continue
        a, b = (view.canon(v) for v in u.invars)
        for oh_side, s_side in ((a, b), (b, a)):
            oh = idioms.one_hot(view, oh_side)
            if oh is not None and view.canon(oh[0]) is view.canon(ids):
                if idioms.unexpand(view, s_side)[0] is view.canon(scores):
                    return True
    return False


def _read_post(view: View, f: _Found, ids: Any, num_e: int) -> None:
    """Follow renorm / scale / per-expert-scale steps on the weights, in order."""
    w = f.weights
    k_axis = len(_shape(w)) - 1
    nonneg = _nonneg_weights(f)
    while True:
        users = view.users(w)
        if view.is_output(w):
            _check_no_partial_renorm(view, w, users, k_axis)
            break
        step = _renorm_step(view, w, users, k_axis, nonneg)
        if step is None and len(users) == 1:
            one = _scale_step(view, w, users[0], ids, num_e, f)
            step = None if one is None else ([one[0]], one[1])
        if step is None:
            if not f.post:  # after a renorm, what else the program does to the weights stays as written
                _check_no_partial_renorm(view, w, users, k_axis)
            break
        f.post.extend(step[0])
        nonneg = nonneg and all(
            st[0] in ("renorm", "renorm_max") or (st[0] == "scale" and st[1] >= 0) for st in step[0]
        )
        w = step[1]
    f.out_weights = w


def _check_no_partial_renorm(view: View, w: Any, users: list, k_axis: int) -> None:
    """Reject weights that are renormalised but also used un-normalised, or summed oddly."""
    for u in users:
        if u.primitive.name != "reduce_sum":
            continue
        if tuple(u.params["axes"]) != (k_axis,):
            raise _Reject(
                f"the weights are summed over axis {tuple(u.params['axes'])}, not the k axis "
                f"({k_axis}): not a renormalisation moefuse can fuse"
            )
        if len(users) > 2 or view.is_output(w):
            raise _Reject("the top-k weights are renormalised but also used un-normalised elsewhere")


def _nonneg_weights(f: _Found) -> bool:
    """Whether the raw weights are >= 0: softmax / sigmoid scores, or the top values of those masked
    with a fill >= 0 (a selection bias only ever reaches weights gathered from the unbiased scores)."""
    if f.score not in ("softmax", "sigmoid"):
        return False
    return f.group is None or f.weights_from == "scores" or f.group[3] >= 0


def _renorm_step(
    view: View, w: Any, users: list, k_axis: int, nonneg: bool
) -> tuple[list[tuple], Any] | None:
    """w / (sum(w) + eps) or w / max(sum(w), eps), also spelled (w * c) / ..., and for w >= 0
    w / norm(w, ord=1) (a sum of |w|): -> renorm / renorm_max (then scale) steps."""
    absolute = [u for u in users if nonneg and u.primitive.name == "abs"]
    users = [u for u in users if u not in absolute]
    w_abs = None
    if len(absolute) == 1:  # |w| == w: its sum is w's sum
        users += view.users(absolute[0].outvars[0])
        w_abs = view.canon(absolute[0].outvars[0])
    elif absolute:
        return None
    sums = [u for u in users if u.primitive.name == "reduce_sum"]
    rest = [u for u in users if u.primitive.name != "reduce_sum"]
    if len(sums) != 1 or len(rest) != 1:
        return None
    steps: list[tuple] = []
    num_eqn = rest[0]
    if num_eqn.primitive.name == "mul":
        c = next((view.scalar(v) for v in num_eqn.invars if view.canon(v) is not w), None)
        nxt = view.users(num_eqn.outvars[0])
        if c is None or len(nxt) != 1 or nxt[0].primitive.name != "div":
            return None
        steps.append(("scale", c))
        num, num_eqn = view.canon(num_eqn.outvars[0]), nxt[0]
    else:
        num = w
    if num_eqn.primitive.name != "div" or view.canon(num_eqn.invars[0]) is not num:
        return None
    den = view.canon(num_eqn.invars[1])
    eps, kind = 0.0, "renorm"
    red = idioms.reduction(view, den, "sum")
    if red is None:
        base, _ = idioms.unexpand(view, den)
        node = next((a for a in (den, base) if view.op(a) in ("add", "max")), None)
        if node is None:
            return None
        a, b = view.args(node)
        for r_side, e_side in ((a, b), (b, a)):
            if view.scalar(e_side) is not None:
                red = idioms.reduction(view, r_side, "sum")
                eps, kind = view.scalar(e_side), "renorm" if view.op(node) == "add" else "renorm_max"
                break
    if red is None or not (view.canon(red[0]) is w or view.canon(red[0]) is w_abs):
        return None
    if red[1] != (k_axis,):
        raise _Reject(f"the weights are renormalised over axis {red[1]}, not the k axis ({k_axis})")
    return [(kind, eps), *steps], view.canon(num_eqn.outvars[0])


def _scale_step(view: View, w: Any, u: Any, ids: Any, num_e: int, f: _Found) -> tuple[tuple, Any] | None:
    if u.primitive.name != "mul":
        return None
    a, b = (view.canon(v) for v in u.invars)
    other = b if a is w else a
    c = view.scalar(other)
    if c is not None:
        return ("scale", c), view.canon(u.outvars[0])
    got = idioms.take(view, other)
    if got is not None and view.canon(got[1]) is view.canon(ids) and _shape(got[0]) == (num_e,):
        if f.expert_scale is not None:
            return None
        f.expert_scale = got[0]
        return ("expert_scale",), view.canon(u.outvars[0])
    return None


def _group_limited(view: View, sel: Any) -> tuple[Any, int, int, str, float] | None:
    """(x, n_group, topk_group, group_score, fill) if sel masks x to the best groups.

    The mask is read in either layout: `where(mask[.., E], x, fill)`, the mask a reshape of a
    [.., G, E/G] broadcast of the chosen groups, or `where(flags[.., G, 1], x.reshape(.., G, E/G),
    fill).reshape(.., E)` (the same select done per group, then flattened: a reshape of an
    elementwise op is the op of the reshaped operands)."""
    per_group = (
        view.op(sel) == "reshape"
        and view.params(sel).get("dimensions") is None
        and view.op(view.args(sel)[0]) == "select_n"
    )
    masked = view.args(sel)[0] if per_group else sel
    if view.op(masked) != "select_n" or len(view.args(masked)) != 3:
        return None
    pred, on_false, on_true = view.args(masked)
    member = idioms.membership(view, pred)
    if member is None:
        return None
    if per_group:
        grouped = _group_flags(view, pred, _shape(masked))
    else:
        grouped = _expand_groups(view, member[0], _shape(masked))
        grouped = grouped and (grouped[0], grouped[1], grouped[2] == member[1])
    chosen_true = grouped[2] if grouped else member[1]  # whether pred is true for the chosen groups
    x, fill_atom = (on_true, on_false) if chosen_true else (on_false, on_true)
    if per_group and (x := _flattened_groups(view, x, _shape(sel))) is None:
        return None
    if view.scalar(fill_atom) is None:
        raise _Reject("experts of dropped groups are filled with a non-constant value")
    if grouped is None:
        raise _Reject(
            "experts are masked before the top-k, but not by a choice of consecutive expert groups "
            "moefuse can read (a fused router can only drop whole consecutive groups)"
        )
    gi, n_group, _ = grouped
    got = _group_choice(view, gi, x, n_group)
    if got is None:
        raise _Reject(
            "group mask found, but the group scores are not top-2 sums or maxima of the same selection scores"
        )
    topk_group, group_score = got
    return x, n_group, topk_group, group_score, view.scalar(fill_atom)


def _flattened_groups(view: View, grouped: Any, shape: tuple[int, ...]) -> Any | None:
    """x if `grouped` is x[.., E] reshaped to [.., G, E/G] (x of `shape`), else None."""
    gshape = _shape(grouped)
    if len(gshape) != len(shape) + 1 or gshape[:-2] != shape[:-1] or gshape[-2] * gshape[-1] != shape[-1]:
        return None
    eqn = view.producer(grouped)
    if eqn is None or eqn.primitive.name != "reshape" or eqn.params.get("dimensions") is not None:
        return None
    x = view.canon(eqn.invars[0])
    return x if _shape(x) == shape else None


def _expand_groups(view: View, mask: Any, shape: tuple[int, ...]) -> tuple[Any, int, bool] | None:
    """(chosen-group ids, n_group, True) if mask[.., e] says whether expert e's group was chosen."""
    eqn = view.producer(mask)
    if eqn is None or eqn.primitive.name != "reshape":
        return None
    grouped = view.canon(eqn.invars[0])
    gshape = _shape(grouped)
    if len(gshape) != len(shape) + 1 or gshape[:-2] != shape[:-1] or gshape[-2] * gshape[-1] != shape[-1]:
        return None
    return _group_flags(view, grouped, gshape)


def _group_flags(view: View, flags: Any, gshape: tuple[int, ...]) -> tuple[Any, int, bool] | None:
    """(chosen-group ids, n_group, positive) if flags[.., g, j] is the same for every expert j of
    group g, and non-zero (positive) or zero (not positive) exactly for the chosen groups g.

    Broadcasts along the experts of a group and size-1 dims are looked through, as are the
    comparisons with 0 and casts to bool `idioms.membership` reads (each flips or keeps the sense)."""
    lead = gshape[:-1]
    positive, atom = True, flags
    for _ in range(8):
        base, dims = idioms.unexpand(view, atom)
        shape = _shape(base)
        if shape[: len(lead)] != lead or any(n != 1 for n in shape[len(lead) :]):
            return None
        if any(dims.get(d) != d for d in range(len(lead))):
            return None
        if shape == lead and (gi := idioms.chosen_along_last(view, base, lead[-1])) is not None:
            return gi, lead[-1], positive
        member = idioms.membership(view, base)
        if member is None or member[0] is base:
            return None
        atom, positive = member[0], positive == member[1]
    return None


def _top2_input(view: View, vals: Any, cols: tuple[int, ...] = (0, 1)) -> Any | None:
    """x if vals (or its columns `cols`) are the values of top_k(x, 2) over the last axis, in any order.

    Spelled `top_k(x, 2)[0]`, `jnp.sort(x)[..., -2:]`, or, for groups of two experts, x itself or its
    sort (the two largest of two values are both; the fused op's top-2 sum v0 + v1 is exact in either
    order)."""
    if vals is None or sorted(cols) != [0, 1]:
        return None
    t = view.producer(vals)
    if t is not None and t.primitive.name == "slice":
        return _last_two_of_sort(view, t)
    if t is not None and t.primitive.name == "top_k" and t.params["k"] == 2 and view.out_index(vals) == 0:
        return view.canon(t.invars[0])
    if _shape(vals)[-1] != 2:
        return None
    src = _sort_input(view, vals)
    return view.canon(vals) if src is None else src


def _last_two_of_sort(view: View, sl: Any) -> Any | None:
    """x if sl = sort(x, last axis)[..., -2:]: the two largest, as `jnp.sort(g)[..., -2:]` spells top-2."""
    src = view.canon(sl.invars[0])
    shape = _shape(src)
    if any(st != 1 for st in sl.params.get("strides") or ()):
        return None
    starts, limits = sl.params["start_indices"], sl.params["limit_indices"]
    want = [(0, n) for n in shape[:-1]] + [(shape[-1] - 2, shape[-1])]
    return _sort_input(view, src) if list(zip(starts, limits)) == want else None


def _sort_input(view: View, atom: Any) -> Any | None:
    """x if atom = sort(x) along its last axis (one operand, ascending), else None."""
    srt = view.producer(atom)
    if srt is None or srt.primitive.name != "sort" or len(srt.invars) != 1:
        return None
    return view.canon(srt.invars[0]) if srt.params["dimension"] == len(_shape(atom)) - 1 else None


def _sum_of_columns(view: View, atom: Any) -> tuple[Any, tuple[int, ...]]:
    """(vals, (i, j)) if atom = vals[..., i] + vals[..., j] (slices of the last axis)."""
    cols, srcs = [], []
    for part in view.args(atom):
        eqn = view.producer(part)
        if eqn is not None and eqn.primitive.name == "squeeze":
            eqn = view.producer(eqn.invars[0])
        if (
            eqn is None
            or eqn.primitive.name != "slice"
            or any(st != 1 for st in eqn.params.get("strides") or ())
        ):
            return None, ()
        lo, hi = eqn.params["start_indices"][-1], eqn.params["limit_indices"][-1]
        if hi - lo != 1:
            return None, ()
        cols.append(lo)
        srcs.append(view.canon(eqn.invars[0]))
    if len(srcs) != 2 or srcs[0] is not srcs[1]:
        return None, ()
    return srcs[0], tuple(cols)


def _max_plus_runner_up(view: View, atom: Any) -> Any | None:
    """x if atom = max(x) + max(where(iota == argmax(x), -inf, x)) over the last axis: the largest plus
    the largest of the rest, with the first maximum masked (so a tie counts twice, as top_k's two
    values do): the top-2 sum."""
    last = len(_shape(atom))
    for a, b in itertools.permutations(view.args(atom)):
        first, rest = idioms.reduction(view, a, "max"), idioms.reduction(view, b, "max")
        if first is None or rest is None or first[1] != (last,) or rest[1] != (last,):
            continue
        x, masked = first[0], rest[0]
        if view.op(masked) != "select_n" or len(view.args(masked)) != 3:
            continue
        pred, kept, dropped = view.args(masked)
        if not view.same(kept, x) or view.scalar(dropped) != float("-inf") or view.op(pred) != "eq":
            continue
        if any(_is_first_argmax_of(view, p, i, x, last) for p, i in itertools.permutations(view.args(pred))):
            return x
    return None


def _is_first_argmax_of(view: View, pos: Any, iota: Any, x: Any, axis: int) -> bool:
    """Whether pos is argmax(x, axis) broadcast back along axis, and iota counts along axis."""
    base, dims = idioms.unexpand(view, pos)
    if view.op(base) != "argmax" or tuple(view.params(base)["axes"]) != (axis,):
        return False
    if not view.same(view.args(base)[0], x) or any(dims.get(d) != d for d in range(axis)):
        return False
    it, it_dims = idioms.unexpand(view, iota)
    return view.op(it) == "iota" and it_dims.get(view.params(it)["dimension"]) == axis


def _group_choice(view: View, gi: Any, x: Any, n_group: int) -> tuple[int, str] | None:
    eqn = view.producer(gi)
    if eqn is None or eqn.primitive.name != "top_k" or view.out_index(gi) != 1:
        return None
    gscores = view.canon(eqn.invars[0])
    topk_group = eqn.params["k"]
    name = view.op(gscores)
    if name == "reduce_max":
        (src,) = view.args(gscores)
        kind = "max"
    elif name == "reduce_sum" and tuple(view.params(gscores)["axes"]) == (len(_shape(gscores)),):
        src = _top2_input(view, view.args(gscores)[0])
        kind = "top2_sum"
    elif name == "add":
        src = _top2_input(view, *_sum_of_columns(view, gscores)) or _max_plus_runner_up(view, gscores)
        kind = "top2_sum"
    else:
        return None
    if src is None:
        return None
    r = view.producer(src)
    if r is None or r.primitive.name != "reshape" or view.canon(r.invars[0]) is not view.canon(x):
        return None
    if _shape(src)[-2] != n_group:
        return None
    return topk_group, kind


def _proposal(view: View, anchor: int, f: _Found, expose: bool) -> Proposal:
    from moefuse.kernels.route import RouteParams, route

    ids = f.selection.ids
    num_e = _shape(f.selection.scores)[-1]
    n_group, topk_group, group_score, fill = f.group if f.group else (1, 1, "top2_sum", float("-inf"))
    params = RouteParams(
        num_experts=num_e,
        k=f.selection.k,
        score=f.score,
        order=f.order,
        selection_bias=f.bias is not None,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        group_fill=fill,
        weights_from=f.weights_from,
        post=tuple(f.post),
        expose_scores=expose,
    )
    inputs = (
        [f.logits]
        + ([f.bias] if f.bias is not None else [])
        + ([f.expert_scale] if f.expert_scale is not None else [])
    )
    dense = f.dense_out is not None
    outputs = [f.dense_out if dense else f.out_weights, ids] + ([f.scores] if expose else [])
    has_bias, has_scale = f.bias is not None, f.expert_scale is not None

    def emit(kernel: str, logits: Any, *rest: Any) -> list[Any]:
        rest_l = list(rest)
        bias = rest_l.pop(0) if has_bias else None
        scale = rest_l.pop(0) if has_scale else None
        out = list(route(logits, params, bias=bias, expert_scale=scale, impl=kernel))
        if dense:  # each weight at its expert, +0.0 elsewhere, as where(mask, scores, 0) has them
            out[0] = jnp.put_along_axis(jnp.zeros(logits.shape, out[0].dtype), out[1], out[0], axis=-1,
                                        inplace=False)
        return out

    def widen(leaks: list[Any]) -> Proposal | None:
        if expose or dense or f.score == "none" or any(v is not f.scores for v in leaks):
            return None
        return _proposal(view, anchor, f, expose=True)

    return Proposal(
        op=OP,
        anchor=anchor,
        inputs=inputs,
        outputs=outputs,
        params=params.describe(),
        emit=emit,
        expose=widen,
        notes=f.notes,
    )
