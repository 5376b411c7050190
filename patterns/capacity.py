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
Anything else (`<=` off by one, counts over the wrong groups, positions per choice without the
earlier choices' counts, weights from another choice) declines with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from moefuse import _compat as C
from moefuse import idioms
from moefuse.match import NoMatch, Proposal
from moefuse.patterns.experts import _dot, _dot_labels, _through_transpose, activation_of
from moefuse.view import View

OP = "moe"
SUPPORTED = (
    (
        OP,
        "capacity dispatch (token dropping)",
        "GShard top-2 (per-choice exclusive cumsum + earlier choices' kept counts, `combine.astype(bool)` "
        "dispatch), MaxText (cumsum over flattened (s, k), `<= C`, `[B,S,E,C]` einsums), Switch "
        "(`one_hot(cumsum * mask - 1, C)`); experts `einsum('...ec,...d->ec...d')` then batched per-expert "
        "matmuls",
        "num_experts, k, activation, capacity, capacity_order, capacity_groups",
    ),
)


_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "relu", "silu")


class _Reject(Exception):
    """The capacity logic is not provably the kernel's drop rule (the message says why)."""


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


# --------------------------------------------------------------------------------------------
# the abstract values
# --------------------------------------------------------------------------------------------
# Expressions (what a value holds at one assignment):
#   ("c", v)         the constant v
#   ("u",)           unknown
#   ("lp", d)        the assignment's position among its own choice's assignments (local) + d
#   ("p", d)         its position p in the block's priority order + d; where p >= C the value may be
#                    any number >= C + d (earlier choices' *kept* counts clamp at C)
#   ("kp", d, z)     p + d where p < C, else z
#   ("k",)           the keep bit [p < C]
#   ("d",)           [p == c] on a capacity dim (so 0 where dropped)
_ONE, _ZERO, _UNK = ("c", 1.0), ("c", 0.0), ("u",)


@dataclasses.dataclass(frozen=True)
class Val:
    labels: tuple  # per dim: "t0".. token dims, "K", "E", "C", or None (broadcast / size 1)
    kind: str  # "m": mask arithmetic; "cnt": counts of choices `fams` per expert; "sum": terms
    on: tuple = _ONE
    off: tuple = _ZERO  # at experts other than the assignment's own (only if "E" in labels)
    fam: Any = None  # the ids value the assignment belongs to (None: constant)
    weights: tuple = ()  # weight atoms multiplied in (atom, labels)
    ksum: bool = False  # summed over the k axis of a [.., K] family
    fams: frozenset = frozenset()
    terms: tuple = ()


@dataclasses.dataclass
class _Ctx:
    tok: tuple[int, ...]  # token shape (x.shape[:-1])
    num_e: int
    ids_fams: dict = dataclasses.field(default_factory=dict)  # fam atom -> "slot" | "k"
    masks: list = dataclasses.field(default_factory=list)  # one_hot(ids) atoms (region boundary)
    orders: set = dataclasses.field(default_factory=set)
    caps: set = dataclasses.field(default_factory=set)
    cdims: set = dataclasses.field(default_factory=set)
    first: set = dataclasses.field(default_factory=set)  # families used without earlier counts
    before: dict = dataclasses.field(default_factory=dict)  # fam -> families counted before it
    outside: list = dataclasses.field(default_factory=list)  # constants that must lie outside [0, C)
    memo: dict = dataclasses.field(default_factory=dict)

    @property
    def nt(self) -> int:
        return len(self.tok)

    @property
    def scan(self) -> str:
        return f"t{self.nt - 1}"

    @property
    def max_count(self) -> int:
        return math.prod(self.tok) * self.num_e + 2


def _tok_labels(ctx: _Ctx) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(ctx.nt))


def _const(v: float) -> Val:
    return Val(labels=(), kind="m", on=("c", v), off=("c", v))


# ---- expression algebra ---------------------------------------------------------------------
def _emul(a: tuple, b: tuple) -> tuple:
    for x, y in ((a, b), (b, a)):
        if x == _ZERO:
            return _ZERO
        if x == _ONE:
            return y
    if a[0] == "c" and b[0] == "c":
        return ("c", a[1] * b[1])
    if "u" in (a[0], b[0]):
        return _UNK
    pair = {a[0], b[0]}
    if pair == {"k"}:
        return ("k",)
    if pair == {"d"} or pair == {"k", "d"}:
        return ("d",)
    if pair == {"k", "p"} or pair == {"k", "kp"}:
        pos = a if a[0] != "k" else b
        return ("kp", pos[1], 0.0)
    raise _Reject(f"a product of {_describe(a)} and {_describe(b)} the capacity proof does not cover")


def _eadd(a: tuple, b: tuple, sign: float) -> tuple:
    if a[0] == "u" or b[0] == "u":
        return _UNK
    if b[0] != "c":
        if sign > 0 and a[0] == "c":
            return _eadd(b, a, 1.0)
        raise _Reject(f"{_describe(a)} {'+' if sign > 0 else '-'} {_describe(b)} is not a position offset")
    v = sign * b[1]
    if a[0] == "c":
        return ("c", a[1] + v)
    if a[0] in ("lp", "p"):
        return (a[0], a[1] + v)
    if a[0] == "kp":
        return ("kp", a[1] + v, a[2] + v)
    raise _Reject(f"{_describe(a)} shifted by a constant is not a position")


def _describe(e: tuple) -> str:
    return {
        "c": lambda: f"the constant {e[1]:g}",
        "u": lambda: "an unknown count",
        "lp": lambda: "a per-choice position",
        "p": lambda: "a position",
        "kp": lambda: "a kept position",
        "k": lambda: "a keep bit",
        "d": lambda: "a capacity-slot indicator",
    }[e[0]]()


def _bool_table(e: tuple, fn: Any) -> tuple:
    """fn applied to a 0/1-valued expression (k or d): k, d, or a constant."""
    lo, hi = bool(fn(0.0)), bool(fn(1.0))
    if (lo, hi) == (False, True):
        return e
    if lo == hi:
        return ("c", float(lo))
    raise _Reject("a negated keep mask")


_CMP = {
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "ne": lambda a, b: a != b,
    "eq": lambda a, b: a == b,
}


def _ecmp(ctx: _Ctx, fam: Any, op: str, e: tuple, c: float) -> tuple:
    """`e op c` for the capacity constant c on the right."""
    if e[0] == "u":
        return _UNK
    if e[0] == "c":
        return ("c", float(_CMP[op](e[1], c)))
    if e[0] in ("k", "d"):
        return _bool_table(e, lambda v: _CMP[op](v, c))
    if e[0] == "lp":
        e = _first(ctx, fam, e)
    if e[0] == "p":
        if op == "lt":
            ctx.caps.add(c - e[1])
        elif op == "le":
            ctx.caps.add(c - e[1] + 1)
        else:
            raise _Reject(f"positions compared with `{op}` {c:g}: not a `< capacity` drop rule")
        if ctx.caps and any(cap != int(cap) or cap < 0 for cap in ctx.caps):
            raise _Reject("capacity is not a whole number")
        return ("k",)
    raise _Reject(f"{_describe(e)} compared with a constant")


def _first(ctx: _Ctx, fam: Any, e: tuple) -> tuple:
    """A per-choice position used as the block position: fam must be the first choice."""
    ctx.first.add(fam)
    return ("p", e[1])


# --------------------------------------------------------------------------------------------
# the interpreter
# --------------------------------------------------------------------------------------------
def _sem(view: View, atom: Any, ctx: _Ctx) -> Val | None:
    """The abstract value of atom, or None when it is not mask arithmetic (e.g. a weight)."""
    atom = view.canon(atom)
    key = atom if not C.is_literal(atom) else id(atom)
    if key in ctx.memo:
        return ctx.memo[key]
    ctx.memo[key] = None  # no cycles in a jaxpr, but be safe
    got = _sem_uncached(view, atom, ctx)
    ctx.memo[key] = got
    return got


def _sem_uncached(view: View, atom: Any, ctx: _Ctx) -> Val | None:
    s = view.scalar(atom)
    if s is not None:
        return _const(s)
    base, dims = idioms.unexpand(view, atom)
    if base is not atom:
        inner = _sem(view, base, ctx)
        if inner is None:
            return None
        labels = [None] * len(_shape(atom))
        for i, lab in enumerate(inner.labels):
            if i not in dims:
                if lab is not None:
                    return None
                continue
            labels[dims[i]] = lab
        if sum(lab is not None for lab in inner.labels) != sum(lab is not None for lab in labels):
            return None
        return dataclasses.replace(inner, labels=tuple(labels))
    oh = idioms.one_hot(view, atom)
    if oh is not None:
        return _one_hot(view, atom, oh[0], oh[1], ctx)
    name = view.op(atom)
    args = view.args(atom)
    if name == "convert_element_type":
        inner = _sem(view, args[0], ctx)
        if inner is not None:
            _check_dtype(atom.aval.dtype, inner, ctx)
        return inner
    if name == "transpose":
        inner = _sem(view, args[0], ctx)
        if inner is None:
            return None
        perm = view.params(atom)["permutation"]
        return dataclasses.replace(inner, labels=tuple(inner.labels[p] for p in perm))
    if name == "reshape":
        return _flat_cumsum(view, atom, ctx)
    if name == "cumsum":
        return _cumsum(view, atom, ctx)
    if name in ("mul", "add", "sub"):
        return _binary(view, atom, name, ctx)
    if name in _CMP:
        return _compare(view, atom, name, ctx)
    if name == "reduce_sum":
        return _reduce(view, atom, ctx)
    if name == "select_n":
        return _select(view, atom, ctx)
    if name == "dot_general":
        return _dot_general(view, atom, ctx)
    return None


def _check_dtype(dtype: Any, v: Val, ctx: _Ctx) -> None:
    """Counts and positions must be exact in the dtype the program computes them in."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        ok = v.kind == "m" and all(e[0] in ("k", "d") or e in (_ZERO, _ONE) for e in (v.on, v.off))
        if not ok and not v.weights:
            raise _Reject("a position or count is converted to bool")
        return
    if v.weights:
        return  # the weights themselves may be rounded: the fused op rounds them the same way
    exprs = [v.on, v.off] if v.kind == "m" else [_UNK]
    if all(e[0] in ("k", "d") or e in (_ZERO, _ONE) for e in exprs):
        return  # 0 / 1 values are exact in every dtype
    if jnp.issubdtype(dt, jnp.floating):
        exact = 2 ** (jnp.finfo(dt).nmant + 1)
    elif jnp.issubdtype(dt, jnp.integer):
        exact = int(jnp.iinfo(dt).max)
    else:
        raise _Reject(f"mask arithmetic in {dt}")
    if exact < ctx.max_count:
        raise _Reject(f"positions are counted in {dt}, which cannot hold every count exactly")


def _is_ids(view: View, atom: Any, ctx: _Ctx) -> str | None:
    """ "slot" for one choice's ids (token shape), "k" for all k choices ([.., K]); ids in range."""
    if not jnp.issubdtype(atom.aval.dtype, jnp.integer):
        return None
    shp = _shape(atom)
    kind = "slot" if shp == ctx.tok else "k" if shp[:-1] == ctx.tok and len(shp) == ctx.nt + 1 else None
    if kind is None or not _in_range(view, atom, ctx.num_e):
        return None
    return kind


def _in_range(view: View, ids: Any, n: int) -> bool:
    """ids provably in [0, n): top_k / argmax indices over an axis of n (sliced, squeezed, cast)."""
    ids = view.canon(ids)
    eqn = view.producer(ids)
    if eqn is None:
        return False
    name = eqn.primitive.name
    if name == "top_k":
        return view.out_index(ids) == 1 and _shape(eqn.invars[0])[-1] == n
    if name == "argmax":
        (axis,) = eqn.params["axes"]
        return _shape(eqn.invars[0])[axis] == n
    if name in ("squeeze", "slice", "reshape", "broadcast_in_dim", "convert_element_type", "transpose"):
        if name == "convert_element_type" and not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.integer):
            return False
        return _in_range(view, eqn.invars[0], n)
    if name == "concatenate":
        return all(_in_range(view, v, n) for v in eqn.invars)
    return False


def _one_hot(view: View, atom: Any, src: Any, n: int, ctx: _Ctx) -> Val | None:
    src = view.canon(src)
    pos = _sem(view, src, ctx)
    if pos is None:
        kind = _is_ids(view, src, ctx)
        if kind is None or n != ctx.num_e:
            return None
        ctx.ids_fams.setdefault(src, kind)
        ctx.masks.append(atom)
        labels = _tok_labels(ctx) + (("K",) if kind == "k" else ()) + ("E",)
        return Val(labels=labels, kind="m", on=_ONE, off=_ZERO, fam=src)
    # one_hot(position, C): the capacity-slot indicator
    if pos.kind != "m" or pos.weights or pos.ksum or "C" in pos.labels:
        raise _Reject("one_hot over capacity of something that is not a position")
    ctx.cdims.add(n)

    def slot(e: tuple) -> tuple:
        if e[0] == "lp":
            e = _first(ctx, pos.fam, e)
        if e[0] == "p" and e[1] == 0:
            return ("d",)
        if e[0] == "kp" and e[1] == 0:
            ctx.outside.append(e[2])
            return ("d",)
        if e[0] == "c":
            ctx.outside.append(e[1])
            return _ZERO
        if e[0] == "u":
            return _UNK
        raise _Reject(f"one_hot over capacity of {_describe(e)} (a position off by {e[1]:g})")

    on = slot(pos.on)
    off = slot(pos.off) if "E" in pos.labels else on
    return Val(labels=pos.labels + ("C",), kind="m", on=on, off=off, fam=pos.fam)


def _cumsum(view: View, atom: Any, ctx: _Ctx, token_major: Val | None = None) -> Val | None:
    eqn = view.producer(atom)
    inner = token_major if token_major is not None else _sem(view, eqn.invars[0], ctx)
    if inner is None:
        return None
    axis = eqn.params["axis"]
    if eqn.params.get("reverse"):
        raise _Reject("a reverse cumsum: positions counted from the last token")
    if inner.kind != "m" or inner.weights or inner.ksum or (inner.on, inner.off) != (_ONE, _ZERO):
        raise _Reject("cumsum of something other than the one-hot expert mask")
    if token_major is not None:
        on = ("p", 1.0)
        ctx.orders.add("token_major")
    else:
        if inner.labels[axis] != ctx.scan:
            raise _Reject(
                f"cumsum over axis {axis}, not the last token axis: capacity groups would not be "
                "consecutive tokens"
            )
        if ctx.ids_fams.get(inner.fam) == "k" and _shape(inner.fam)[-1] > 1:
            raise _Reject("positions counted per choice over tokens without the earlier choices' counts")
        on = ("lp", 1.0)
        ctx.orders.add("slot_major")
    return dataclasses.replace(inner, on=on, off=_UNK)


def _flat_cumsum(view: View, atom: Any, ctx: _Ctx) -> Val | None:
    """reshape(cumsum(reshape(mask [.., S, K, E] -> [.., S*K, E]))): token-major positions."""
    cs = view.canon(view.args(atom)[0])
    ce = view.producer(cs)
    if ce is None or ce.primitive.name != "cumsum":
        return None
    src = view.canon(ce.invars[0])
    if view.op(src) != "reshape":
        return None
    mask = view.canon(view.args(src)[0])
    m = _sem(view, mask, ctx)
    if m is None or _shape(mask) != _shape(atom):
        return None
    labels = m.labels
    n = len(labels)
    axis = ce.params["axis"]
    if n < 3 or labels[-3:] != (ctx.scan, "K", "E") or len(_shape(src)) != n - 1 or axis != n - 3:
        raise _Reject("a cumsum over flattened dims other than (last token axis, k)")
    if _shape(src) != _shape(mask)[:-3] + (_shape(mask)[-3] * _shape(mask)[-2], _shape(mask)[-1]):
        raise _Reject("a cumsum over flattened dims other than (last token axis, k)")
    got = _cumsum(view, cs, ctx, token_major=m)
    return None if got is None else dataclasses.replace(got, labels=labels)


def _aligned(view: View, atom: Any, rank: int, ctx: _Ctx) -> tuple[Val | None, Any, tuple]:
    """(value, base, labels in the output's dims) of one operand of an elementwise op."""
    v = _sem(view, atom, ctx)
    if v is not None:
        return v, atom, v.labels + (None,) * (rank - len(v.labels))
    base, dims = idioms.unexpand(view, atom)
    return None, base, tuple(dims.get(i) for i in range(len(_shape(base))))


def _merge(a: tuple, b: tuple) -> tuple:
    out = []
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None and x != y:
            raise _Reject(f"values laid out with {x} against {y}")
        out.append(x if x is not None else y)
    return tuple(out)


def _binary(view: View, atom: Any, name: str, ctx: _Ctx) -> Val | None:
    a, b = view.args(atom)
    rank = len(_shape(atom))
    va, base_a, la = _aligned(view, a, rank, ctx)
    vb, base_b, lb = _aligned(view, b, rank, ctx)
    if va is None and vb is None:
        return None
    if name != "mul" and (va is None or vb is None):
        return None
    if va is None or vb is None:  # a weight times mask arithmetic
        v, lv, base, dims = (vb, lb, base_a, la) if va is None else (va, la, base_b, lb)
        if v.kind != "m" or v.weights:
            return None
        w_labels = tuple(lv[d] if d is not None else None for d in dims)
        return dataclasses.replace(v, labels=lv, weights=((base, w_labels),))
    labels = _merge(la, lb)
    if va.kind in ("cnt", "sum") or vb.kind in ("cnt", "sum"):
        return _add_special(va, vb, labels, name, ctx)
    fam = _one_fam(va, vb)
    if fam is False:
        if name != "add":
            raise _Reject("mask arithmetic mixes two different choices")
        terms = (dataclasses.replace(va, labels=labels), dataclasses.replace(vb, labels=labels))
        return Val(labels=labels, kind="sum", terms=terms)
    has_e = "E" in labels
    offa = va.off if "E" in va.labels else va.on
    offb = vb.off if "E" in vb.labels else vb.on
    if name == "mul":
        on, off = _emul(va.on, vb.on), (_emul(offa, offb) if has_e else _ZERO)
        weights = va.weights + vb.weights
    else:
        if va.weights or vb.weights:
            return None
        sign = 1.0 if name == "add" else -1.0
        on, off = _esub(va.on, vb.on, sign), (_esub(offa, offb, sign) if has_e else _ZERO)
        weights = ()
    ksum = va.ksum or vb.ksum
    return Val(labels=labels, kind="m", on=on, off=off, fam=fam, weights=weights, ksum=ksum)


def _esub(a: tuple, b: tuple, sign: float) -> tuple:
    """a + sign * b; two positions of one assignment (cumsum - mask) subtract to a position."""
    return _eadd(a, b, sign)


def _one_fam(va: Val, vb: Val) -> Any:
    if va.fam is None or vb.fam is None or va.fam is vb.fam:
        return va.fam if va.fam is not None else vb.fam
    return False


def _add_special(va: Val, vb: Val, labels: tuple, name: str, ctx: _Ctx) -> Val | None:
    if name != "add":
        raise _Reject("counts subtracted from positions")
    if va.kind == "sum" or vb.kind == "sum":
        terms = []
        for v in (va, vb):
            terms.extend(v.terms if v.kind == "sum" else (dataclasses.replace(v, labels=labels),))
        return Val(labels=labels, kind="sum", terms=tuple(terms))
    if va.kind == "cnt" and vb.kind == "cnt":
        if va.fams & vb.fams:
            raise _Reject("a choice's count added twice")
        return Val(labels=labels, kind="cnt", fams=va.fams | vb.fams)
    pos, cnt = (va, vb) if vb.kind == "cnt" else (vb, va)
    if pos.kind != "m" or pos.weights or pos.on[0] != "lp":
        raise _Reject("expert counts added to something that is not a per-choice position")
    if pos.fam in cnt.fams or pos.fam in ctx.before:
        raise _Reject("a choice offset by its own or a second set of counts")
    ctx.before[pos.fam] = cnt.fams
    off = pos.off if pos.off[0] == "u" else _UNK
    return dataclasses.replace(pos, labels=labels, on=("p", pos.on[1]), off=off)


def _compare(view: View, atom: Any, name: str, ctx: _Ctx) -> Val | None:
    a, b = view.args(atom)
    c = view.scalar(b)
    if c is None:
        c, a = view.scalar(a), b
        name = {"lt": "gt", "gt": "lt", "le": "ge", "ge": "le"}.get(name, name)
    if c is None:
        return None
    v = _sem(view, a, ctx)
    if v is None:
        return None
    if v.kind != "m" or v.weights:
        raise _Reject("a comparison of counts or weighted values")
    on = _ecmp(ctx, v.fam, name, v.on, c)
    off = _ecmp(ctx, v.fam, name, v.off, c) if "E" in v.labels else on
    return dataclasses.replace(v, on=on, off=off)


def _reduce(view: View, atom: Any, ctx: _Ctx) -> Val | None:
    eqn = view.producer(atom)
    v = _sem(view, eqn.invars[0], ctx)
    if v is None:
        return None
    axes = tuple(eqn.params["axes"])
    if len(axes) != 1:
        raise _Reject("mask values summed over several axes at once")
    (axis,) = axes
    lab = v.labels[axis]
    labels = v.labels[:axis] + v.labels[axis + 1 :]
    if v.kind == "sum" and lab == "E":
        return None
    if v.kind != "m":
        raise _Reject(f"counts summed over {lab}")
    if lab == "E":  # per assignment (exactly one expert is its own: ids are in range)
        if v.off != _ZERO or "C" in v.labels and v.on[0] == "d" and v.weights:
            raise _Reject("a sum over experts that picks up other experts' values")
        return dataclasses.replace(v, labels=labels, off=_ZERO)
    if lab == ctx.scan and "E" in v.labels:
        if v.weights or v.ksum or v.off != _ZERO or v.on not in (_ONE, ("k",)):
            raise _Reject("a sum over tokens that is not a count of assignments per expert")
        if ctx.ids_fams.get(v.fam) != "slot":
            raise _Reject("counts of all k choices at once")
        return Val(labels=labels, kind="cnt", fams=frozenset({v.fam}))
    if lab == "K":
        return dataclasses.replace(v, labels=labels, ksum=True)
    raise _Reject(f"mask values summed over {lab or 'a broadcast dim'}")


def _select(view: View, atom: Any, ctx: _Ctx) -> Val | None:
    pred, on_false, on_true = view.args(atom)
    vp = _sem(view, pred, ctx)
    vt = _sem(view, on_true, ctx)
    vf = _sem(view, on_false, ctx)
    if vp is None or vt is None or vf is None:
        return None
    if "E" in vp.labels or "E" in vt.labels or vp.on != ("k",) or vf.on[0] != "c" or vt.weights:
        raise _Reject("a select between positions that is not `where(kept, position, constant)`")
    if vt.on[0] not in ("kp", "p"):
        raise _Reject("a select between positions that is not `where(kept, position, constant)`")
    fam = _one_fam(vp, vt)
    if fam is False:
        raise _Reject("a keep mask of one choice selects another choice's position")
    if len(vp.labels) != len(vt.labels):
        return None
    labels = _merge(vp.labels, vt.labels)
    return Val(labels=labels, kind="m", on=("kp", vt.on[1], vf.on[1]), off=_ZERO, fam=fam)


def _dot_general(view: View, atom: Any, ctx: _Ctx) -> Val | None:
    """einsum of mask values (and at most one weight): the product, summed over k."""
    eqn = view.producer(atom)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (view.canon(v) for v in eqn.invars)
    vl, vr = _sem(view, lhs, ctx), _sem(view, rhs, ctx)
    if vl is None and vr is None:
        return None
    if vl is not None and vr is not None:
        l_lab, r_lab = vl.labels, vr.labels
    else:
        v = vl if vl is not None else vr
        if v.kind != "m" or v.weights:
            return None
        w_atom = rhs if vl is not None else lhs
        w_lab = _weight_labels(view, w_atom, ctx, v)
        if w_lab is None:
            return None
        l_lab, r_lab = (v.labels, w_lab) if vl is not None else (w_lab, v.labels)
    if any(l_lab[i] != r_lab[j] for i, j in zip(lb, rb)) or any(l_lab[i] != r_lab[j] for i, j in zip(lc, rc)):
        raise _Reject("an einsum of masks that pairs different dims")
    contracted = [l_lab[i] for i in lc]
    if contracted not in ([], ["K"]):
        raise _Reject(f"an einsum of masks summing over {contracted}")
    labels = _dot_labels(l_lab, r_lab, lc, rc, lb, rb)
    if len(set(labels)) != len(labels):
        return None
    if vl is not None and vr is not None:
        if vl.kind != "m" or vr.kind != "m":
            return None
        fam = _one_fam(vl, vr)
        if fam is False:
            raise _Reject("mask arithmetic mixes two different choices")
        has_e = "E" in labels
        offl = vl.off if "E" in vl.labels else vl.on
        offr = vr.off if "E" in vr.labels else vr.on
        out = Val(
            labels=labels,
            kind="m",
            on=_emul(vl.on, vr.on),
            off=_emul(offl, offr) if has_e else _ZERO,
            fam=fam,
            weights=vl.weights + vr.weights,
            ksum=vl.ksum or vr.ksum,
        )
    else:
        v = vl if vl is not None else vr
        w_atom = rhs if vl is not None else lhs
        out = dataclasses.replace(v, labels=labels, weights=((w_atom, _weight_labels(view, w_atom, ctx, v)),))
    if contracted:
        if ctx.ids_fams.get(out.fam) != "k":
            raise _Reject("a sum over k of values that are not per choice")
        out = dataclasses.replace(out, ksum=True)
    return out


def _weight_labels(view: View, w: Any, ctx: _Ctx, v: Val) -> tuple | None:
    shp = _shape(w)
    if shp == ctx.tok:
        return _tok_labels(ctx)
    if shp[:-1] == ctx.tok and "K" in v.labels:
        return _tok_labels(ctx) + ("K",)
    return None


# --------------------------------------------------------------------------------------------
# the expert FFN on dispatched buffers
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Ffn:
    x: Any
    dispatch: Any
    x_dims: tuple  # x's dims matched to the dispatch tensor: (token dims..., "D")
    d_labels: tuple  # labels of the dispatch tensor's dims: token dims t0.., "E", "C"
    w_gate: Any
    w_up: Any | None
    w_down: Any
    activation: str
    w_gate_dims: tuple
    w_up_dims: tuple | None
    w_down_dims: tuple
    labels: tuple  # labels of the expert outputs: "E", "C", "D", group token dims


def _expert_inputs(view: View, atom: Any) -> tuple[Any, Any, tuple, tuple, tuple] | None:
    """(x, dispatch, labels, x token count, dispatch dims) for einsum('..sec,..sd->e..cd')."""
    base, perm = _through_transpose(view, atom)
    got = _dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for d_side, x_side, dc, xc, db, xb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        nx = len(_shape(x_side))
        nd = len(_shape(d_side))
        nt = nx - 1
        if nd != nt + 2 or len(xc) != 1 or tuple(xb) + tuple(xc) != tuple(range(nt)):
            continue
        if tuple(db) + tuple(dc) != tuple(range(nt)):
            continue
        # dispatch dims: tokens (batched groups, then the contracted axis), then E, C
        x_lab = tuple(f"t{i}" for i in range(nt)) + ("D",)
        d_lab = tuple(f"t{i}" for i in range(nt)) + ("E", "C")
        if d_side is lhs:
            labels = _dot_labels(d_lab, x_lab, dc, xc, db, xb)
        else:
            labels = _dot_labels(x_lab, d_lab, xc, dc, xb, db)
        return x_side, d_side, tuple(labels[p] for p in perm), d_lab, x_lab
    return None


def _proj(view: View, atom: Any, num_e: int, contract: str, new: str) -> tuple | None:
    """(input, W, labels of atom, W labels) for atom = input . W[E, .., ..] batched over E."""
    base, perm = _through_transpose(view, atom)
    got = _dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for a_side, w_side, ac, wc, ab, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        if len(_shape(w_side)) != 3 or len(wb) != 1 or len(wc) != 1 or _shape(w_side)[wb[0]] != num_e:
            continue
        w_lab = ["?"] * 3
        w_lab[wb[0]], w_lab[wc[0]] = "E", contract
        w_lab[next(i for i in range(3) if i not in (wb[0], wc[0]))] = new
        return a_side, w_side, ac, wc, ab, wb, tuple(w_lab), perm, w_side is lhs
    return None


def _expert_outputs(view: View, out: Any, num_e: int) -> _Ffn | None:
    down = _proj(view, out, num_e, "F", "D")
    if down is None:
        return None
    h, wd, hc, wc, hb, wb, wd_lab, perm, w_first = down
    if view.op(h) == "convert_element_type":
        return None  # hidden activations rounded to another dtype: not the kernel's compute dtype
    inner = activation_of(view, h)
    if inner is None or inner[0] not in _ACTIVATIONS:
        return None
    act, gate, up = inner[0], inner[1], inner[2]
    g = _up(view, gate, num_e)
    u = None if up is None else _up(view, up, num_e)
    if g is None or (up is not None and (u is None or u[0] is not g[0] or u[1] is not g[1] or u[2] != g[2])):
        return None
    x, dispatch, g_labels, wg, wg_lab, d_lab, x_lab = g
    if len(hb) != 1 or len(hc) != 1 or g_labels[hb[0]] != "E" or g_labels[hc[0]] != "F":
        return None
    if w_first:
        labels = _dot_labels(wd_lab, g_labels, wc, hc, wb, hb)
    else:
        labels = _dot_labels(g_labels, wd_lab, hc, wc, hb, wb)
    return _Ffn(
        x=x,
        dispatch=dispatch,
        x_dims=x_lab,
        d_labels=d_lab,
        w_gate=wg,
        w_up=None if u is None else u[3],
        w_down=wd,
        activation=act,
        w_gate_dims=wg_lab,
        w_up_dims=None if u is None else u[4],
        w_down_dims=wd_lab,
        labels=tuple(labels[p] for p in perm),
    )


def _up(view: View, atom: Any, num_e: int) -> tuple | None:
    """(x, dispatch, labels, W, W labels, dispatch labels, x labels) for dispatched x . W[E, D, F]."""
    got = _proj(view, atom, num_e, "D", "F")
    if got is None:
        return None
    a, w, ac, wc, ab, wb, w_lab, perm, w_first = got
    ei = _expert_inputs(view, a)
    if ei is None:
        return None
    x, dispatch, a_labels, d_lab, x_lab = ei
    if len(ab) != 1 or a_labels[ab[0]] != "E" or a_labels[ac[0]] != "D":
        return None
    if w_first:
        labels = _dot_labels(w_lab, a_labels, wc, ac, wb, ab)
    else:
        labels = _dot_labels(a_labels, w_lab, ac, wc, ab, wb)
    return x, dispatch, tuple(labels[p] for p in perm), w, w_lab, d_lab, x_lab


# --------------------------------------------------------------------------------------------
# the pattern
# --------------------------------------------------------------------------------------------
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
        except _Reject as r:
            return NoMatch(anchor, f"capacity dispatch not fused: {r}", OP)


CAPACITY = CapacityPattern()


def _match(view: View, anchor: int) -> Proposal | NoMatch:
    eqn = view.jaxpr.eqns[anchor]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (view.canon(v) for v in eqn.invars)
    for comb, eo, cc, oc, cb, ob in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        for num_e in sorted({_shape(eo)[i] for i in oc}):
            ffn = _expert_outputs(view, eo, num_e)
            if ffn is not None:
                return _prove(view, anchor, eqn, ffn, num_e, comb, cc, oc, cb, ob)
    return NoMatch(anchor, "not a combine of per-expert capacity buffers", OP)


def _prove(view: View, anchor: int, eqn: Any, ffn: _Ffn, num_e: int, comb: Any, cc, oc, cb, ob) -> Proposal:
    x = ffn.x
    tok = _shape(x)[:-1]
    nt = len(tok)
    ctx = _Ctx(tok=tok, num_e=num_e)
    # the final einsum: y[tokens, D] = sum_{e, c} combine[tokens, e, c] * out[e, groups, c, D]
    o_lab = ffn.labels
    if sorted(o_lab) != sorted(["E", "C", "D"] + [f"t{i}" for i in range(nt - 1)]):
        raise _Reject("the expert buffers are not laid out as [E, groups, C, D]")
    if sorted(o_lab[i] for i in oc) != ["C", "E"]:
        raise _Reject("the combine does not sum the expert buffers over (expert, slot)")
    cv = _sem(view, comb, ctx)
    if cv is None:
        raise _Reject("the combine tensor is not built from the router's weights and one-hot masks")
    c_lab = cv.labels
    if [c_lab[i] for i in cc] != [o_lab[i] for i in oc] or [c_lab[i] for i in cb] != [o_lab[i] for i in ob]:
        raise _Reject("the combine einsum pairs combine and buffer dims differently")
    if [c_lab[i] for i in cb] != [f"t{i}" for i in range(nt - 1)]:
        raise _Reject("the combine einsum does not batch the token groups")
    y_lab = _dot_labels(c_lab, o_lab, cc, oc, cb, ob)
    if tuple(y_lab) != _tok_labels(ctx) + ("D",):
        raise _Reject("the block output is not laid out as [tokens..., D] like its input")
    # the dispatch tensor that built the buffers
    d_atom = ffn.dispatch
    if tuple(ffn.d_labels[:nt]) != _tok_labels(ctx):
        raise _Reject("the dispatch einsum does not gather tokens by the last token axis per group")
    support = _support_of(view, d_atom, comb)
    if support:
        dv = None
    else:
        dv = _sem(view, d_atom, ctx)
        if dv is None:
            raise _Reject("the dispatch tensor is not built from the one-hot masks")
        if dv.labels != ffn.d_labels:
            raise _Reject("the dispatch tensor's dims are not the combine's")
    if c_lab != ffn.d_labels and tuple(sorted(c_lab, key=str)) != tuple(sorted(ffn.d_labels, key=str)):
        raise _Reject("dispatch and combine have different dims")
    slots, order = _slots(ctx)
    terms = _terms(cv, slots, weighted=True)
    if dv is not None:
        dterms = _terms(dv, slots, weighted=False)
        if [f for f, _ in dterms] != [f for f, _ in terms]:
            raise _Reject("dispatch and combine cover different choices")
    cap = _capacity(ctx)
    weights = []
    for fam, w in terms:
        w_atom, w_lab = w
        weights.append(_router_weight(view, w_atom, w_lab, fam, ctx))
    k = sum(1 if ctx.ids_fams[f] == "slot" else _shape(f)[-1] for f in slots)
    groups = math.prod(tok[:-1])
    combine_dtype = comb.aval.dtype
    if ffn.x.aval.dtype != eqn.outvars[0].aval.dtype:
        raise _Reject("the block output dtype differs from the tokens' dtype")
    for w in (ffn.w_gate, ffn.w_up, ffn.w_down):
        if w is not None and w.aval.dtype != x.aval.dtype:
            raise _Reject("expert weights and tokens have different dtypes (mixed-precision FFN)")
    return _proposal(view, anchor, ffn, slots, weights, k, num_e, cap, order, groups, combine_dtype, ctx)


def _support_of(view: View, d: Any, comb: Any) -> bool:
    """Whether d == (comb != 0) (GShard's `combine.astype(bool)`), cast back to a number."""
    d = view.canon(d)
    while view.op(d) == "convert_element_type":
        inner = view.args(d)[0]
        if inner.aval.dtype == np.bool_:
            src = view.canon(inner)
            if view.op(src) == "convert_element_type":
                return view.same(view.args(src)[0], comb)
            if view.op(src) == "ne":
                a, b = view.args(src)
                return view.scalar(b) == 0 and view.same(a, comb)
            return False
        d = view.canon(inner)
    return False


def _slots(ctx: _Ctx) -> tuple[list, str]:
    fams = list(ctx.ids_fams)
    if not fams:
        raise _Reject("no one-hot expert mask of the router's ids")
    kinds = {ctx.ids_fams[f] for f in fams}
    if kinds == {"k"}:
        if len(fams) != 1:
            raise _Reject("masks of two different [.., k] id arrays")
        f = fams[0]
        if _shape(f)[-1] > 1 and ctx.orders != {"token_major"}:
            raise _Reject("positions of all k choices not counted in one order")
        return fams, "token_major" if _shape(f)[-1] > 1 else "slot_major"
    if kinds != {"slot"}:
        raise _Reject("masks of per-choice ids mixed with [.., k] ids")
    if ctx.orders - {"slot_major"}:
        raise _Reject("per-choice masks counted token-major")
    # slot-major: choice i is offset by exactly the counts of choices 0..i-1
    order = []
    remaining = set(fams)
    while remaining:
        nxt = [f for f in remaining if ctx.before.get(f, frozenset()) == frozenset(order)]
        if len(nxt) != 1:
            raise _Reject(
                "the choices' positions are not offset by exactly the earlier choices' counts "
                "(slot-major order not provable)"
            )
        order.append(nxt[0])
        remaining.discard(nxt[0])
    if ctx.first - {order[0]}:
        raise _Reject("a later choice's positions are used without the earlier choices' counts")
    return order, "slot_major"


def _terms(v: Val, slots: list, weighted: bool) -> list:
    """[(fam, weight)] of a combine (weighted) / dispatch: sum over choices of w * [slot indicator]."""
    terms = v.terms if v.kind == "sum" else (v,)
    out = []
    for t in terms:
        what = "combine" if weighted else "dispatch"
        if t.kind != "m" or t.on != ("d",) or t.off != _ZERO or "C" not in t.labels or "E" not in t.labels:
            raise _Reject(
                f"the {what} tensor is not `[ids == e] * [position == c]` for kept assignments "
                f"(it holds {_describe(t.on)} at the assignment's expert)"
            )
        if weighted and len(t.weights) != 1:
            raise _Reject(f"the combine tensor has {len(t.weights)} weight factors per assignment, not 1")
        if not weighted and t.weights:
            raise _Reject("the dispatch tensor is weighted")
        if "K" in t.labels:
            raise _Reject(f"the {what} tensor keeps the k axis")
        if slots and ("k" if t.ksum else "slot") != ("k" if _is_k(t, slots) else "slot"):
            raise _Reject(f"the {what} tensor does not sum over all k choices")
        out.append((t.fam, t.weights[0] if weighted else None))
    fams = [f for f, _ in out]
    if sorted(map(id, fams)) != sorted(map(id, slots)):
        raise _Reject("the combine does not cover every choice exactly once")
    order = {id(f): i for i, f in enumerate(slots)}
    return sorted(out, key=lambda fw: order[id(fw[0])])


def _is_k(t: Val, slots: list) -> bool:
    return len(slots) == 1 and len(_shape(slots[0])) > 0 and t.ksum


def _capacity(ctx: _Ctx) -> int:
    if len(ctx.cdims) != 1:
        raise _Reject("no single capacity dimension")
    (cdim,) = ctx.cdims
    if ctx.caps and ctx.caps != {cdim}:
        got = ", ".join(f"{c:g}" for c in sorted(ctx.caps))
        raise _Reject(
            f"assignments are kept while position < {got}, but the buffers have {cdim} slots "
            "(an off-by-one `<=` or a capacity from another group size)"
        )
    for z in ctx.outside:
        if 0 <= z < cdim:
            raise _Reject(f"dropped assignments are sent to slot {z:g} of the buffers")
    return int(cdim)


def _router_weight(view: View, w: Any, w_lab: tuple, fam: Any, ctx: _Ctx) -> Any:
    """The weight var of choice `fam` (as the kernel takes it), proven to be the router's weight."""
    want = _tok_labels(ctx) + (("K",) if ctx.ids_fams[fam] == "k" else ())
    if tuple(w_lab) != want:
        raise _Reject("the combine weights are not laid out per token and choice")
    if not _tied(view, w, fam, ctx, 8):
        raise _Reject("the combine weights are not the router's weights of the same choice")
    return w


def _tied(view: View, w: Any, fam: Any, ctx: _Ctx, depth: int) -> bool:
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
    k_fam = len(_shape(fam)) == ctx.nt + 1
    sm = idioms.softmax(view, w)
    if sm is not None and k_fam and sm.axis == len(_shape(w)) - 1:
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
            yv = _sem(view, y, ctx)
            if yv is not None and yv.on == ("k",) and yv.fam is fam and _tied(view, x, fam, ctx, depth - 1):
                return True
        return False
    if name == "reduce_sum" and not k_fam:  # sum(scores * one_hot(ids), -1)
        (prod,) = args
        if tuple(view.params(w)["axes"]) != (len(_shape(prod)) - 1,) or view.op(prod) != "mul":
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
        return _shape(view.canon(den)) in (_shape(w), ())  # one choice per array: any per-token value
    _, dims = idioms.unexpand(view, den)
    return len(_shape(w)) - 1 not in dims.values()


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


def _proposal(view, anchor, ffn: _Ffn, slots, weights, k, num_e, cap, order, groups, combine_dtype, ctx):
    from moefuse.kernels.moe import MoeParams, moe_ffn

    y = view.jaxpr.eqns[anchor].outvars[0]
    act = {"geglu_tanh": "geglu", "gelu_tanh": "gelu"}.get(ffn.activation, ffn.activation)
    params = MoeParams(
        num_experts=num_e,
        k=k,
        activation=act,
        gelu_approximate=ffn.activation.endswith("_tanh"),
        capacity=cap,
        capacity_order=order,
        capacity_groups=groups,
        weights_dtype=jnp.dtype(combine_dtype).name,
    )
    gated = ffn.w_up is not None
    n_s = len(slots)
    masks = list(dict.fromkeys(view.canon(m) for m in ctx.masks))
    inputs = [ffn.x, *weights, *slots, ffn.w_gate] + ([ffn.w_up] if gated else []) + [ffn.w_down] + masks
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

    described = params.describe()
    for key in ("swiglu_alpha", "swiglu_limit", "gate_up_layout"):
        described.pop(key, None)
    if act not in ("gelu", "geglu"):
        described.pop("gelu_approximate", None)
    described["dispatch"] = "capacity"
    return Proposal(op=OP, anchor=anchor, inputs=inputs, outputs=[y], params=described, emit=emit)
