"""The abstract interpreter of capacity mask arithmetic (the proof behind `patterns/capacity.py`).

`interpret(view, atom, ctx)` reads how a capacity block computes its masks -- one_hot of the router's
ids, cumsum over tokens (also over tokens and k flattened into one axis, and values computed in that
layout), +/- and comparisons with constants, products, sums over experts / tokens / k, one_hot of
positions (also of position + d with its first d slots sliced off), where, einsums, the k weights
scattered to their experts -- and returns, for every value, what it holds at one
assignment (token t, choice j): at the assignment's own expert (`on`) and at the other experts
(`off`), as one of the expressions below, plus the router weights multiplied in. Per-choice
positions, the counts added to them and the keep thresholds are recorded in `Ctx` so the pattern
can check afterwards that they spell exactly the kernel's priority order and capacity. Anything
whose value the algebra cannot pin down raises `Reject` with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from moefuse import _compat as C
from moefuse import idioms
from moefuse.patterns.dots import dot_labels
from moefuse.view import View


class Reject(Exception):
    """The capacity logic is not provably the kernel's drop rule (the message says why)."""


def shape(a: Any) -> tuple[int, ...]:
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
#   ("kd", z)        [p == c] where p < C, else [z == c] for a slot z in [0, C) (one_hot of a kept
#                    position that is z where dropped); times a keep bit it is ("d",)
_ONE, ZERO, _UNK = ("c", 1.0), ("c", 0.0), ("u",)


# Dim labels: "t0".. token dims, "K", "E", "C" (slot c of the buffers), None (broadcast / size 1),
# (scan, "K") for the last token axis and k flattened into one token-major axis ([.., S * K, ..]),
# and ("C", d) for a capacity axis whose index i is slot i - d (one_hot of a position + d, before
# its first d entries are sliced off; what a value says it holds there is true for slots c >= 0,
# the ones the slice keeps).


@dataclasses.dataclass(frozen=True)
class Val:
    labels: tuple  # per dim, see "Dim labels" above
    kind: str  # "m": mask arithmetic; "cnt": counts of choices `fams` per expert; "sum": terms
    on: tuple = _ONE
    off: tuple = ZERO  # at experts other than the assignment's own (only if "E" in labels)
    fam: Any = None  # the ids value the assignment belongs to (None: constant)
    weights: tuple = ()  # weight atoms multiplied in (atom, labels)
    ksum: bool = False  # summed over the k axis of a [.., K] family
    fams: frozenset = frozenset()
    terms: tuple = ()


@dataclasses.dataclass
class Ctx:
    tok: tuple[int, ...]  # token shape (x.shape[:-1])
    num_e: int
    ids_fams: dict = dataclasses.field(default_factory=dict)  # fam atom -> "slot" | "k"
    masks: list = dataclasses.field(default_factory=list)  # one_hot(ids), scattered weights (region boundary)
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


def token_labels(ctx: Ctx) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(ctx.nt))


def _flat(ctx: Ctx) -> tuple[str, str]:
    """The label of the last token axis and k flattened token-major into one axis."""
    return (ctx.scan, "K")


def slot_shift(labels: tuple) -> int | None:
    """d for a dim labelled ("C", d) (slots still shifted by d), None if there is none."""
    return next((lab[1] for lab in labels if isinstance(lab, tuple) and lab[0] == "C"), None)


def _has_slots(labels: tuple) -> bool:
    """Whether some dim is a capacity axis (shifted or not)."""
    return "C" in labels or slot_shift(labels) is not None


def _const(v: float) -> Val:
    return Val(labels=(), kind="m", on=("c", v), off=("c", v))


# ---- expression algebra ---------------------------------------------------------------------
def _emul(a: tuple, b: tuple) -> tuple:
    for x, y in ((a, b), (b, a)):
        if x == ZERO:
            return ZERO
        if x == _ONE:
            return y
    if a[0] == "c" and b[0] == "c":
        return ("c", a[1] * b[1])
    if "u" in (a[0], b[0]):
        return _UNK
    pair = {a[0], b[0]}
    if pair == {"k"}:
        return ("k",)
    if pair == {"d"} or pair == {"k", "d"} or pair == {"kd", "k"} or pair == {"kd", "d"}:
        return ("d",)  # where kept both are [p == c]; dropped: the keep bit / indicator is 0
    if pair == {"kd"}:  # 0 / 1 values; dropped ones in two different slots multiply to 0
        return a if a == b else ("d",)
    if pair == {"k", "p"} or pair == {"k", "kp"}:
        pos = a if a[0] != "k" else b
        return ("kp", pos[1], 0.0)
    raise Reject(f"a product of {describe(a)} and {describe(b)} the capacity proof does not cover")


def _eadd(a: tuple, b: tuple, sign: float) -> tuple:
    """a + sign * b; two positions of one assignment (cumsum - mask) subtract to a position."""
    if a[0] == "u" or b[0] == "u":
        return _UNK
    if b[0] != "c":
        if sign > 0 and a[0] == "c":
            return _eadd(b, a, 1.0)
        raise Reject(f"{describe(a)} {'+' if sign > 0 else '-'} {describe(b)} is not a position offset")
    v = sign * b[1]
    if a[0] == "c":
        return ("c", a[1] + v)
    if a[0] in ("lp", "p"):
        return (a[0], a[1] + v)
    if a[0] == "kp":
        return ("kp", a[1] + v, a[2] + v)
    raise Reject(f"{describe(a)} shifted by a constant is not a position")


def describe(e: tuple) -> str:
    return {
        "c": lambda: f"the constant {e[1]:g}",
        "u": lambda: "an unknown count",
        "lp": lambda: "a per-choice position",
        "p": lambda: "a position",
        "kp": lambda: "a kept position",
        "k": lambda: "a keep bit",
        "d": lambda: "a capacity-slot indicator",
        "kd": lambda: f"a capacity-slot indicator that sends dropped assignments to slot {e[1]:g}",
    }[e[0]]()


def _bool_table(e: tuple, fn: Any) -> tuple:
    """fn applied to a 0/1-valued expression (k, d or kd): itself or a constant."""
    lo, hi = bool(fn(0.0)), bool(fn(1.0))
    if (lo, hi) == (False, True):
        return e
    if lo == hi:
        return ("c", float(lo))
    raise Reject("a negated keep mask")


_CMP = {
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "ne": lambda a, b: a != b,
    "eq": lambda a, b: a == b,
}


def _ecmp(ctx: Ctx, fam: Any, op: str, e: tuple, c: float) -> tuple:
    """`e op c` for the capacity constant c on the right."""
    if e[0] == "u":
        return _UNK
    if e[0] == "c":
        return ("c", float(_CMP[op](e[1], c)))
    if e[0] in ("k", "d", "kd"):
        return _bool_table(e, lambda v: _CMP[op](v, c))
    if e[0] == "lp":
        e = _first(ctx, fam, e)
    if e[0] == "p":
        if op == "lt":
            ctx.caps.add(c - e[1])
        elif op == "le":
            ctx.caps.add(c - e[1] + 1)
        else:
            raise Reject(f"positions compared with `{op}` {c:g}: not a `< capacity` drop rule")
        if ctx.caps and any(cap != int(cap) or cap < 0 for cap in ctx.caps):
            raise Reject("capacity is not a whole number")
        return ("k",)
    raise Reject(f"{describe(e)} compared with a constant")


def _first(ctx: Ctx, fam: Any, e: tuple) -> tuple:
    """A per-choice position used as the block position: fam must be the first choice."""
    ctx.first.add(fam)
    return ("p", e[1])


def _mul(ctx: Ctx, fam: Any, a: tuple, b: tuple) -> tuple:
    """a * b at one assignment of choice fam.

    A per-choice position times the assignment's keep bit (`position * mask`, GShard) is the kept
    position: the keep bit is decided on the block position, so the per-choice position must be it
    (fam is the first choice; `_slots` rejects the block otherwise).
    """
    for x, y in ((a, b), (b, a)):
        if x[0] == "lp" and y[0] == "k":
            return _emul(_first(ctx, fam, x), y) if x is a else _emul(y, _first(ctx, fam, x))
    return _emul(a, b)


# --------------------------------------------------------------------------------------------
# the interpreter
# --------------------------------------------------------------------------------------------
def interpret(view: View, atom: Any, ctx: Ctx) -> Val | None:
    """The abstract value of atom, or None when it is not mask arithmetic (e.g. a weight)."""
    atom = view.canon(atom)
    key = atom if not C.is_literal(atom) else id(atom)
    if key in ctx.memo:
        return ctx.memo[key]
    ctx.memo[key] = None  # no cycles in a jaxpr, but be safe
    got = _sem_uncached(view, atom, ctx)
    ctx.memo[key] = got
    return got


def _sem_uncached(view: View, atom: Any, ctx: Ctx) -> Val | None:
    s = view.scalar(atom)
    if s is not None:
        return _const(s)
    base, dims = idioms.unexpand(view, atom)
    if base is not atom:
        inner = interpret(view, base, ctx)
        if inner is None:
            return None
        labels = [None] * len(shape(atom))
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
    put = idioms.put_along_last_axis(view, atom)
    if put is not None:
        return _scattered_weights(view, atom, put[0], put[1], ctx)
    name = view.op(atom)
    args = view.args(atom)
    if name == "convert_element_type":
        inner = interpret(view, args[0], ctx)
        if inner is not None:
            _check_dtype(atom.aval.dtype, inner, ctx)
        return inner
    if name == "transpose":
        inner = interpret(view, args[0], ctx)
        if inner is None:
            return None
        perm = view.params(atom)["permutation"]
        return dataclasses.replace(inner, labels=tuple(inner.labels[p] for p in perm))
    if name == "reshape":
        return _reshape(view, atom, ctx)
    if name == "slice":
        return _slice(view, atom, ctx)
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


def _check_dtype(dtype: Any, v: Val, ctx: Ctx) -> None:
    """Counts and positions must be exact in the dtype the program computes them in."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        ok = v.kind == "m" and all(e[0] in ("k", "d", "kd") or e in (ZERO, _ONE) for e in (v.on, v.off))
        if not ok and not v.weights:
            raise Reject("a position or count is converted to bool")
        return
    if v.weights:
        return  # the weights themselves may be rounded: the fused op rounds them the same way
    exprs = [v.on, v.off] if v.kind == "m" else [_UNK]
    if all(e[0] in ("k", "d", "kd") or e in (ZERO, _ONE) for e in exprs):
        return  # 0 / 1 values are exact in every dtype
    if jnp.issubdtype(dt, jnp.floating):
        exact = 2 ** (jnp.finfo(dt).nmant + 1)
    elif jnp.issubdtype(dt, jnp.integer):
        exact = int(jnp.iinfo(dt).max)
    else:
        raise Reject(f"mask arithmetic in {dt}")
    if exact < ctx.max_count:
        raise Reject(f"positions are counted in {dt}, which cannot hold every count exactly")


def _is_ids(view: View, atom: Any, ctx: Ctx) -> str | None:
    """ "slot" for one choice's ids (token shape), "k" for all k choices ([.., K]); ids in range."""
    if not jnp.issubdtype(atom.aval.dtype, jnp.integer):
        return None
    shp = shape(atom)
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
        return view.out_index(ids) == 1 and shape(eqn.invars[0])[-1] == n
    if name == "argmax":
        (axis,) = eqn.params["axes"]
        return shape(eqn.invars[0])[axis] == n
    if name in ("squeeze", "slice", "reshape", "broadcast_in_dim", "convert_element_type", "transpose"):
        if name == "convert_element_type" and not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.integer):
            return False
        return _in_range(view, eqn.invars[0], n)
    if name == "concatenate":
        return all(_in_range(view, v, n) for v in eqn.invars)
    return False


def _one_hot(view: View, atom: Any, src: Any, n: int, ctx: Ctx) -> Val | None:
    src = view.canon(src)
    pos = interpret(view, src, ctx)
    if pos is None:
        kind = _is_ids(view, src, ctx)
        if kind is None or n != ctx.num_e:
            return None
        ctx.ids_fams.setdefault(src, kind)
        ctx.masks.append(atom)
        labels = token_labels(ctx) + (("K",) if kind == "k" else ()) + ("E",)
        return Val(labels=labels, kind="m", on=_ONE, off=ZERO, fam=src)
    # one_hot(position + d, n): the capacity-slot indicator, its slots shifted by d
    if pos.kind != "m" or pos.weights or _has_slots(pos.labels):
        raise Reject("one_hot over capacity of something that is not a position")
    d = _position_offset(pos, n)
    if d == 0:
        ctx.cdims.add(n)

    def slot(e: tuple) -> tuple:
        if e[0] == "lp":
            e = _first(ctx, pos.fam, e)
        if e[0] == "p" and e[1] == d:
            return ("d",)
        if e[0] == "kp" and e[1] == d:
            z = e[2] - d  # the slot dropped assignments land in
            if z == int(z) and 0 <= z < n - d:
                return ("kd", z)  # dropped assignments land in slot z unless a keep bit masks them
            return ("d",)
        if e[0] == "c":
            ctx.outside.append(e[1] - d)
            return ZERO
        if e[0] == "u":
            return _UNK
        raise Reject(f"one_hot over capacity of {describe(e)} (a position off by {e[1]:g})")

    on = slot(pos.on)
    off = slot(pos.off) if "E" in pos.labels else on
    label = "C" if d == 0 else ("C", d)
    return Val(labels=pos.labels + (label,), kind="m", on=on, off=off, fam=pos.fam, ksum=pos.ksum)


def _position_offset(pos: Val, n: int) -> int:
    """d for the one_hot over n classes of a position + d (0 when no position is involved)."""
    e = next((e for e in (pos.on, pos.off) if e[0] in ("lp", "p", "kp")), None)
    if e is None:
        return 0
    if e[1] != int(e[1]) or not 0 <= e[1] < n:
        raise Reject(f"one_hot over capacity of {describe(e)} (a position off by {e[1]:g})")
    return int(e[1])


def _scattered_weights(view: View, atom: Any, ids: Any, updates: Any, ctx: Ctx) -> Val | None:
    """zeros[.., E].at[.., ids].set(w) (or `.add`): each choice's weight w_j at its expert ids_j.

    Written at distinct experts, that is `sum_j w_j * one_hot(ids_j, E)`: a weight times the
    one-hot masks, summed over k.
    """
    ids = view.canon(ids)
    if shape(atom) != ctx.tok + (ctx.num_e,) or _is_ids(view, ids, ctx) != "k":
        return None
    if interpret(view, updates, ctx) is not None:
        return None
    if not idioms.distinct_along_last(view, ids):
        raise Reject("weights written to experts by ids that may repeat an expert within a token")
    ctx.ids_fams.setdefault(ids, "k")
    ctx.masks.append(atom)
    w = (view.canon(updates), token_labels(ctx) + ("K",))
    return Val(labels=token_labels(ctx) + ("E",), kind="m", fam=ids, weights=(w,), ksum=True)


def _cumsum(view: View, atom: Any, ctx: Ctx) -> Val | None:
    """cumsum of the one-hot mask over tokens: positions + 1, per choice (slot-major) or over the
    flattened (last token axis, k) axis (token-major)."""
    eqn = view.producer(atom)
    inner = interpret(view, eqn.invars[0], ctx)
    if inner is None:
        return None
    axis = eqn.params["axis"]
    if eqn.params.get("reverse"):
        raise Reject("a reverse cumsum: positions counted from the last token")
    if inner.kind != "m" or inner.weights or inner.ksum or (inner.on, inner.off) != (_ONE, ZERO):
        raise Reject("cumsum of something other than the one-hot expert mask")
    if inner.labels[axis] == _flat(ctx):
        on = ("p", 1.0)
        ctx.orders.add("token_major")
    else:
        if inner.labels[axis] != ctx.scan:
            raise Reject(
                f"cumsum over axis {axis}, not the last token axis: capacity groups would not be "
                "consecutive tokens"
            )
        if ctx.ids_fams.get(inner.fam) == "k" and shape(inner.fam)[-1] > 1:
            raise Reject("positions counted per choice over tokens without the earlier choices' counts")
        on = ("lp", 1.0)
        ctx.orders.add("slot_major")
    return dataclasses.replace(inner, on=on, off=_UNK)


def _reshape(view: View, atom: Any, ctx: Ctx) -> Val | None:
    """Mask values reshaped [.., S, K, ..] -> [.., S * K, ..] (token-major) or back."""
    if view.params(atom).get("dimensions") is not None:
        return None
    src = view.args(atom)[0]
    inner = interpret(view, src, ctx)
    if inner is None:
        return None
    labels = _reshaped_labels(inner.labels, shape(src), shape(atom), ctx)
    if labels is not None:
        return dataclasses.replace(inner, labels=labels)
    if _merges_token_dims(inner.labels, shape(src), shape(atom), ctx):
        raise Reject(
            "token groups flattened together: positions would be counted over several groups at once"
        )
    raise Reject("mask values reshaped other than by flattening (last token axis, k) and back")


def _merges_token_dims(labels: tuple, src: tuple, out: tuple, ctx: Ctx) -> bool:
    """Whether reshaping src to out merges two adjacent token dims into one."""
    toks = token_labels(ctx)
    return any(
        labels[i] in toks and labels[i + 1] in toks and out == src[:i] + (src[i] * src[i + 1],) + src[i + 2 :]
        for i in range(len(labels) - 1)
    )


def _reshaped_labels(labels: tuple, src: tuple, out: tuple, ctx: Ctx) -> tuple | None:
    """The labels after reshaping src to out, when it merges (scan, K) or splits them again."""
    flat, scan = _flat(ctx), ctx.tok[-1]
    for i in range(len(labels) - 1):
        if labels[i : i + 2] == flat and out == src[:i] + (src[i] * src[i + 1],) + src[i + 2 :]:
            return labels[:i] + (flat,) + labels[i + 2 :]
    for i, lab in enumerate(labels):
        if lab == flat and out == src[:i] + (scan, src[i] // scan) + src[i + 1 :]:
            return labels[:i] + flat + labels[i + 1 :]
    return None


def _slice(view: View, atom: Any, ctx: Ctx) -> Val | None:
    """`slots[..., d:]` of a one_hot over capacity of position + d: the slot indicator itself."""
    eqn = view.producer(atom)
    inner = interpret(view, eqn.invars[0], ctx)
    if inner is None:
        return None
    src = shape(eqn.invars[0])
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(src)
    cut = [i for i, n in enumerate(src) if (start[i], limit[i], strides[i]) != (0, n, 1)]
    d = slot_shift(inner.labels)
    if len(cut) != 1 or inner.labels[cut[0]] != ("C", d) or (start[cut[0]], strides[cut[0]]) != (d, 1):
        raise Reject("a slice of mask values other than cutting off the slots a shifted one_hot adds")
    (i,) = cut
    ctx.cdims.add(limit[i] - start[i])
    return dataclasses.replace(inner, labels=inner.labels[:i] + ("C",) + inner.labels[i + 1 :])


def _aligned(view: View, atom: Any, rank: int, ctx: Ctx) -> tuple[Val | None, Any, tuple]:
    """(value, base, labels in the output's dims) of one operand of an elementwise op."""
    v = interpret(view, atom, ctx)
    if v is not None:
        return v, atom, v.labels + (None,) * (rank - len(v.labels))
    base, dims = idioms.unexpand(view, atom)
    return None, base, tuple(dims.get(i) for i in range(len(shape(base))))


def _merge(a: tuple, b: tuple) -> tuple:
    out = []
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None and x != y:
            raise Reject(f"values laid out with {x} against {y}")
        out.append(x if x is not None else y)
    return tuple(out)


def _binary(view: View, atom: Any, name: str, ctx: Ctx) -> Val | None:
    a, b = view.args(atom)
    rank = len(shape(atom))
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
        if name == "mul" and (va.weights or vb.weights):
            return None  # a router weight computed with another choice's mask: an opaque weight
        if name != "add":
            raise Reject("mask arithmetic mixes two different choices")
        terms = (dataclasses.replace(va, labels=labels), dataclasses.replace(vb, labels=labels))
        return Val(labels=labels, kind="sum", terms=terms)
    has_e = "E" in labels
    offa = va.off if "E" in va.labels else va.on
    offb = vb.off if "E" in vb.labels else vb.on
    if name == "mul":
        on, off = _mul(ctx, fam, va.on, vb.on), (_mul(ctx, fam, offa, offb) if has_e else ZERO)
        weights = va.weights + vb.weights
    else:
        if va.weights or vb.weights:
            return None
        sign = 1.0 if name == "add" else -1.0
        on, off = _eadd(va.on, vb.on, sign), (_eadd(offa, offb, sign) if has_e else ZERO)
        weights = ()
    ksum = va.ksum or vb.ksum
    return Val(labels=labels, kind="m", on=on, off=off, fam=fam, weights=weights, ksum=ksum)


def _one_fam(va: Val, vb: Val) -> Any:
    if va.fam is None or vb.fam is None or va.fam is vb.fam:
        return va.fam if va.fam is not None else vb.fam
    return False


def _add_special(va: Val, vb: Val, labels: tuple, name: str, ctx: Ctx) -> Val | None:
    if name != "add":
        raise Reject("counts subtracted from positions")
    if va.kind == "sum" or vb.kind == "sum":
        terms = []
        for v in (va, vb):
            terms.extend(v.terms if v.kind == "sum" else (dataclasses.replace(v, labels=labels),))
        return Val(labels=labels, kind="sum", terms=tuple(terms))
    if va.kind == "cnt" and vb.kind == "cnt":
        if va.fams & vb.fams:
            raise Reject("a choice's count added twice")
        return Val(labels=labels, kind="cnt", fams=va.fams | vb.fams)
    pos, cnt = (va, vb) if vb.kind == "cnt" else (vb, va)
    if pos.kind != "m" or pos.weights or pos.on[0] != "lp":
        raise Reject("expert counts added to something that is not a per-choice position")
    if pos.fam in cnt.fams or pos.fam in ctx.before:
        raise Reject("a choice offset by its own or a second set of counts")
    ctx.before[pos.fam] = cnt.fams
    off = pos.off if pos.off[0] == "u" else _UNK
    return dataclasses.replace(pos, labels=labels, on=("p", pos.on[1]), off=off)


def _compare(view: View, atom: Any, name: str, ctx: Ctx) -> Val | None:
    a, b = view.args(atom)
    c = view.scalar(b)
    if c is None:
        c, a = view.scalar(a), b
        name = {"lt": "gt", "gt": "lt", "le": "ge", "ge": "le"}.get(name, name)
    if c is None:
        return None
    v = interpret(view, a, ctx)
    if v is None:
        return None
    if v.kind != "m" or v.weights:
        raise Reject("a comparison of counts or weighted values")
    on = _ecmp(ctx, v.fam, name, v.on, c)
    off = _ecmp(ctx, v.fam, name, v.off, c) if "E" in v.labels else on
    return dataclasses.replace(v, on=on, off=off)


def _reduce(view: View, atom: Any, ctx: Ctx) -> Val | None:
    eqn = view.producer(atom)
    v = interpret(view, eqn.invars[0], ctx)
    if v is None:
        return None
    axes = tuple(eqn.params["axes"])
    if len(axes) != 1:
        raise Reject("mask values summed over several axes at once")
    (axis,) = axes
    lab = v.labels[axis]
    labels = v.labels[:axis] + v.labels[axis + 1 :]
    if v.kind == "sum" and lab == "E":
        return None
    if v.kind != "m":
        raise Reject(f"counts summed over {lab}")
    if lab == "E" and not _has_slots(v.labels) and any("E" in w_lab for _, w_lab in v.weights):
        return None  # sum(scores * one_hot(ids), -1): a per-token weight, passed to the kernel as is
    if lab == "E":  # per assignment (exactly one expert is its own: ids are in range)
        if v.off != ZERO or (_has_slots(v.labels) and v.on[0] in ("d", "kd") and v.weights) or v.ksum:
            raise Reject("a sum over experts that picks up other experts' values")
        return dataclasses.replace(v, labels=labels, off=ZERO)
    if lab == ctx.scan and "E" in v.labels:
        if v.weights or v.ksum or v.off != ZERO or v.on not in (_ONE, ("k",)):
            raise Reject("a sum over tokens that is not a count of assignments per expert")
        if ctx.ids_fams.get(v.fam) != "slot":
            raise Reject("counts of all k choices at once")
        return Val(labels=labels, kind="cnt", fams=frozenset({v.fam}))
    if lab == "K":
        return _summed_over_k(view, dataclasses.replace(v, labels=labels), ctx)
    raise Reject(f"mask values summed over {lab or 'a broadcast dim'}")


def _select(view: View, atom: Any, ctx: Ctx) -> Val | None:
    pred, on_false, on_true = view.args(atom)
    vp = interpret(view, pred, ctx)
    vt = interpret(view, on_true, ctx)
    vf = interpret(view, on_false, ctx)
    if vp is None or vt is None or vf is None:
        return None
    if "E" in vp.labels or "E" in vt.labels or vp.on != ("k",) or vf.on[0] != "c" or vt.weights:
        raise Reject("a select between positions that is not `where(kept, position, constant)`")
    if vt.on[0] not in ("kp", "p"):
        raise Reject("a select between positions that is not `where(kept, position, constant)`")
    fam = _one_fam(vp, vt)
    if fam is False:
        raise Reject("a keep mask of one choice selects another choice's position")
    if len(vp.labels) != len(vt.labels):
        return None
    labels = _merge(vp.labels, vt.labels)
    return Val(labels=labels, kind="m", on=("kp", vt.on[1], vf.on[1]), off=ZERO, fam=fam)


def _dot_general(view: View, atom: Any, ctx: Ctx) -> Val | None:
    """einsum of mask values (and at most one weight): the product, summed over k."""
    eqn = view.producer(atom)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (view.canon(v) for v in eqn.invars)
    vl, vr = interpret(view, lhs, ctx), interpret(view, rhs, ctx)
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
        raise Reject("an einsum of masks that pairs different dims")
    contracted = [l_lab[i] for i in lc]
    if contracted not in ([], ["K"]):
        raise Reject(f"an einsum of masks summing over {contracted}")
    labels = dot_labels(l_lab, r_lab, lc, rc, lb, rb)
    if len(set(labels)) != len(labels):
        return None
    if vl is not None and vr is not None:
        if vl.kind != "m" or vr.kind != "m":
            return None
        fam = _one_fam(vl, vr)
        if fam is False:
            raise Reject("mask arithmetic mixes two different choices")
        has_e = "E" in labels
        offl = vl.off if "E" in vl.labels else vl.on
        offr = vr.off if "E" in vr.labels else vr.on
        out = Val(
            labels=labels,
            kind="m",
            on=_mul(ctx, fam, vl.on, vr.on),
            off=_mul(ctx, fam, offl, offr) if has_e else ZERO,
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
            raise Reject("a sum over k of values that are not per choice")
        out = _summed_over_k(view, out, ctx)
    return out


def _summed_over_k(view: View, v: Val, ctx: Ctx) -> Val:
    """v (already laid out without its k axis) summed over the k choices of its family.

    At each expert that is the value of the one choice routed there (0 where none is) only when
    every choice's value is 0 at its other experts and a token's k ids are distinct.
    """
    if "E" not in v.labels or v.off != ZERO:
        raise Reject("a sum over k of values that are not 0 at the choices' other experts")
    if not idioms.distinct_along_last(view, v.fam):
        raise Reject("a sum over k of choices whose ids may repeat an expert within a token")
    return dataclasses.replace(v, ksum=True)


def _weight_labels(view: View, w: Any, ctx: Ctx, v: Val) -> tuple | None:
    shp = shape(w)
    if shp == ctx.tok:
        return token_labels(ctx)
    if shp[:-1] == ctx.tok and "K" in v.labels:
        return token_labels(ctx) + ("K",)
    return None
