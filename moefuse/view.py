"""The canonical view of one flat jaxpr, used only to *find* matches (the rewrite uses the original).

It answers questions about values (jaxpr atoms) in a normal form:

- value numbering: two equations computing the same primitive with the same params on the same
  (canonical) operands are one value, operands of commutative primitives compared in any order
  (a score computed twice, `x[None]` taken twice);
- no-ops removed: casts/reshapes/broadcasts to the same type, reshape round trips
  (`x.reshape(a).reshape(x.shape)`), `copy`, `pvary`, `sharding_constraint`, `name`
  (checkpoint_name), `optimization_barrier`, index normalisation of non-negative indices
  (`select_n(i < 0, i, i + n)`), `x * 1`, and, where asked, `stop_gradient`;
- for a body bound once to its equation's operands (shard_map, jit), what its inputs are bound
  to outside (`outside`)::

    view = View(closed_jaxpr)
    eqn = view.producer(var)           # the equation that makes var (noise skipped)
    view.op(var), view.args(var)       # its primitive name and canonical inputs
    view.users(var)                    # equations consuming var (looking through noise)
    view.reshaped_from(var)            # x when var is x reshaped in row-major order, else None
    view.scalar(atom)                  # python float of a literal / splat constant, else None
    view.outside(var)                  # (outer view, atom) an input of a body is bound to, else None

Idiom recognisers (softmax, sigmoid, one_hot, take_along_axis, ...) live in `moefuse.idioms`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from moefuse import _compat as C

_Literal = C.Literal  # isinstance checks on hot paths, without a call to C.is_literal

# Primitives that never change a value when their output aval equals their input aval (a slice of
# the same shape takes everything; a transpose of the same shape may not be the identity: not here).
_SHAPE_NOOPS = frozenset(
    {"convert_element_type", "reshape", "broadcast_in_dim", "squeeze", "expand_dims", "slice"}
)
_ALWAYS_NOOPS = frozenset(
    {"copy", "copy_p", "pvary", "pbroadcast", "sharding_constraint", "name", "mesh_cast", "reshard"}
)
# Multi-result primitives whose j-th output is their j-th input.
_PASS_THROUGH = frozenset({"optimization_barrier", "device_put"})
# Shape ops that keep the row-major element order (a chain of them back to the same shape is identity).
_ORDER_KEEPING = frozenset({"reshape", "squeeze", "expand_dims", "broadcast_in_dim"})
_NEVER_MERGED = frozenset({"rng_uniform"})  # stateful without an effect: two calls differ
_COMMUTATIVE = frozenset({"add", "mul", "max", "min", "eq", "ne", "and", "or", "xor", "add_any"})
_NONNEG_INDEX_OPS = frozenset({"iota", "argmax", "argmin"})
# b.astype(number) OP const is b itself (the cast holds 0 and 1 only): the const each OP needs
_BOOL_TRUE_WHEN = {"gt": (0.0,), "ne": (0.0,), "eq": (1.0,), "ge": (1.0,)}
_BOOL_TESTS = frozenset({*_BOOL_TRUE_WHEN, "lt", "le"})
_SWAPPED = {"lt": "gt", "le": "ge", "ne": "ne", "eq": "eq", "gt": "lt", "ge": "le"}  # c OP x is x SWAPPED c


@dataclasses.dataclass(frozen=True)
class Bound:
    """What one input of a body is bound to outside: `atom` of the level `view()` returns (built
    on first use)."""

    view: Callable[[], View]
    atom: Any


class View:
    """Canonical, read-only view over a flat ClosedJaxpr."""

    def __init__(self, closed: C.ClosedJaxpr, bound: Sequence[Bound | None] = ()):
        """`bound`: for a body bound once to the operands of its equation (a shard_map, a jit), what
        each of its inputs is bound to in the enclosing level, in input order (see `outside`)."""
        self.closed = closed
        self._bound = dict(zip(closed.jaxpr.invars, bound))
        self.jaxpr = closed.jaxpr
        self.consts: dict[Any, Any] = dict(zip(self.jaxpr.constvars, closed.consts))
        self._producer: dict[Any, tuple[int, int]] = {}
        self._raw_users: dict[Any, list[int]] = defaultdict(list)
        for i, eqn in enumerate(self.jaxpr.eqns):
            for j, v in enumerate(eqn.outvars):
                if not C.is_dropvar(v):
                    self._producer[v] = (i, j)
            for v in eqn.invars:
                if not C.is_literal(v):
                    self._raw_users[v].append(i)
        self.outvars = {v for v in self.jaxpr.outvars if not C.is_literal(v)}
        self.live = live_equations(self.jaxpr)
        self._rep: dict[Any, Any] = {}  # var -> the first var computing the same value
        # canon's answers, memoised per value of its through_stop_gradient flag
        self._canon: dict[bool, dict[Any, Any]] = {False: {}, True: {}}
        self._number_values()
        self._users: dict[Any, list[int]] | None = None

    def _number_values(self) -> None:
        """Map each equation's outputs to those of the first equation computing the same value."""
        seen: dict[Any, C.JaxprEqn] = {}
        for eqn in self.jaxpr.eqns:
            if eqn.effects or not eqn.outvars or eqn.primitive.name in _NEVER_MERGED:
                continue
            key = self._value_key(eqn)
            try:
                first = seen.setdefault(key, eqn) if key is not None else eqn
            except Exception:  # noqa: BLE001 - params whose comparison fails: never merged
                continue
            if first is eqn:
                continue
            for mine, theirs in zip(eqn.outvars, first.outvars):
                if not C.is_dropvar(mine) and not C.is_dropvar(theirs):
                    self._rep[mine] = theirs

    def _value_key(self, eqn: C.JaxprEqn) -> Any:
        operands = [_atom_key(self.canon(v)) for v in eqn.invars]
        if eqn.primitive.name in _COMMUTATIVE:  # one order for a set of operands: vars, then literals
            operands.sort(key=lambda k: (1, k) if isinstance(k, tuple) else (0, id(k)))
        try:
            params = tuple(sorted(eqn.params.items()))  # most params hash as they are
            hash(params)
        except TypeError:  # a list or an array among them: compared by value instead
            try:
                params = _freeze(eqn.params)
                hash(params)
            except Exception:  # noqa: BLE001 - params that cannot be compared: never merged
                return None
        avals = tuple((tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars if hasattr(v.aval, "shape"))
        return eqn.primitive.name, params, tuple(operands), avals

    def outside(self, atom: Any) -> tuple[View, Any] | None:
        """(the enclosing level's view, the atom there) that the input `atom` of this body is bound
        to, or None (not an input, a top-level input, or a body run more than once, as a loop's).
        Evidence only: inside a shard_map the body sees the local shard of that value."""
        atom = self.canon(atom)
        got = None if C.is_literal(atom) else self._bound.get(atom)
        if got is None:
            return None
        outer = got.view()
        return outer, outer.canon(got.atom)

    # ---- raw structure -------------------------------------------------------------------
    def eqn_index(self, var: Any) -> int | None:
        """Index of the equation producing `var` (raw, no canonicalisation)."""
        got = None if isinstance(var, _Literal) else self._producer.get(var)
        return None if got is None else got[0]

    def raw_users(self, var: Any) -> list[int]:
        """Indices of the live equations reading `var` (dead code reads nothing)."""
        return [] if C.is_literal(var) else [i for i in self._raw_users.get(var, []) if i in self.live]

    def raw_producer(self, var: Any) -> tuple[C.JaxprEqn, int] | None:
        got = None if isinstance(var, _Literal) else self._producer.get(var)
        if got is None:
            return None
        return self.jaxpr.eqns[got[0]], got[1]

    # ---- canonical structure -------------------------------------------------------------
    def canon(self, atom: Any, *, through_stop_gradient: bool = False) -> Any:
        """`atom` in normal form: no-ops stripped, and the first var computing the same value.

        Memoised: the normal form of a var depends only on the equations before it, whose own
        numbering (`_rep`) is complete by the time any later equation reads the var."""
        if isinstance(atom, _Literal):
            return atom
        memo = self._canon[through_stop_gradient]
        got = memo.get(atom)
        if got is None:
            got = memo[atom] = self._canon_walk(atom, through_stop_gradient)
        return got

    def _canon_walk(self, atom: Any, through_stop_gradient: bool) -> Any:
        while True:
            if isinstance(atom, _Literal):
                return atom
            atom = self._rep.get(atom, atom)
            got = self.raw_producer(atom)
            if got is None:
                return atom
            eqn, j = got
            name = eqn.primitive.name
            src = eqn.invars[0] if eqn.invars else None
            if name in _ALWAYS_NOOPS or (name == "stop_gradient" and through_stop_gradient):
                atom = src
            elif name in _PASS_THROUGH and len(eqn.invars) == len(eqn.outvars):
                atom = eqn.invars[j]
            elif name in _SHAPE_NOOPS and _same_aval(src, eqn.outvars[0]):
                atom = src
            elif name == "reshape" and (root := self._reshape_round_trip(atom)) is not None:
                atom = root
            elif name == "select_n" and (idx := self._normalised_index(eqn)) is not None:
                atom = idx
            elif name == "select_n" and (q := self._floor_div_of_nonneg(eqn)) is not None:
                atom = q
            elif name == "max" and self._clip_at_zero_of_nonneg(eqn) is not None:
                atom = self._clip_at_zero_of_nonneg(eqn)
            elif name == "mul" and (x := self._times_one(eqn)) is not None:
                atom = x
            elif name in _BOOL_TESTS and (b := self._bool_round_trip(eqn)) is not None:
                atom = b
            else:
                return atom

    def _reshape_round_trip(self, atom: Any) -> Any | None:
        """x if atom = reshape(... reshape-like(x)) with x's shape and dtype (an identity).

        Only a chain ending in a `reshape` is stripped: `ids[..., 0][..., None]` (squeeze, then
        broadcast back) stays as written, since idioms read the squeezed array there.
        """
        size = int(np.prod(atom.aval.shape))
        cur, found = atom, None
        for _ in range(8):
            got = self.raw_producer(cur)
            if got is None or got[0].primitive.name not in _ORDER_KEEPING or not got[0].invars:
                break
            eqn = got[0]
            if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
                break
            src = eqn.invars[0]
            src = src if C.is_literal(src) else self._rep.get(src, src)
            if C.is_literal(src) or int(np.prod(src.aval.shape)) != size or src.aval.dtype != atom.aval.dtype:
                break
            cur = src
            if tuple(cur.aval.shape) == tuple(atom.aval.shape):
                found = cur
        return found

    def reshaped_from(self, atom: Any) -> Any | None:
        """x (canonical) if atom is x with its elements in the same row-major order, only its shape
        changed by one `reshape` (no `dimensions`), `squeeze`, `expand_dims` or a `broadcast_in_dim`
        that only adds unit dims: `w.reshape(-1)`, `ids[:, 0]` of ids [T, 1] and `ids[None]` are ids
        reshaped. None otherwise."""
        eqn = self.producer(atom)
        if eqn is None or eqn.primitive.name not in ("reshape", "squeeze", "expand_dims", "broadcast_in_dim"):
            return None
        src = eqn.invars[0]
        if C.is_literal(src):
            return None
        if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
            return None  # a transpose, then the reshape
        if eqn.primitive.name == "broadcast_in_dim" and (
            np.prod(src.aval.shape) != np.prod(eqn.outvars[0].aval.shape)
            or list(eqn.params["broadcast_dimensions"]) != sorted(eqn.params["broadcast_dimensions"])
        ):
            return None
        return self.canon(src)

    def producer(self, atom: Any, **kw: Any) -> C.JaxprEqn | None:
        got = self.raw_producer(self.canon(atom, **kw))
        return None if got is None else got[0]

    def op(self, atom: Any, **kw: Any) -> str:
        """Primitive name producing the canonical atom ('literal', 'const' or 'input' at leaves)."""
        atom = self.canon(atom, **kw)
        if C.is_literal(atom):
            return "literal"
        if atom in self.consts:
            return "const"
        got = self.raw_producer(atom)
        return "input" if got is None else got[0].primitive.name

    def out_index(self, atom: Any, **kw: Any) -> int:
        got = self.raw_producer(self.canon(atom, **kw))
        return -1 if got is None else got[1]

    def args(self, atom: Any, **kw: Any) -> list[Any]:
        eqn = self.producer(atom, **kw)
        return [] if eqn is None else [self.canon(v, **kw) for v in eqn.invars]

    def params(self, atom: Any, **kw: Any) -> dict[str, Any]:
        eqn = self.producer(atom, **kw)
        return {} if eqn is None else dict(eqn.params)

    def users(self, var: Any) -> list[C.JaxprEqn]:
        """Equations that consume the value of `var` (in normal form: no-op equations looked
        through, a value computed twice counted once), in program order."""
        if C.is_literal(var):
            return []
        if self._users is None:
            self._users = self._index_users()
        return [self.jaxpr.eqns[i] for i in self._users.get(self.canon(var), [])]

    def _index_users(self) -> dict[Any, list[int]]:
        users: dict[Any, list[int]] = defaultdict(list)
        for i, eqn in enumerate(self.jaxpr.eqns):
            outs = [v for v in eqn.outvars if not C.is_dropvar(v)]
            if outs and all(self.canon(v) is not v for v in outs):
                continue  # a no-op alias or a recomputation: its users count as the value's users
            for v in eqn.invars:
                c = self.canon(v)
                if not C.is_literal(c) and (not users[c] or users[c][-1] != i):
                    users[c].append(i)
        return users

    def same(self, a: Any, b: Any, depth: int = 16) -> bool:
        """Whether a and b are the same value: one var, or equal computations on the same inputs."""
        a, b = self.canon(a), self.canon(b)
        if a is b:
            return True
        if C.is_literal(a) or C.is_literal(b):
            va, vb = self.value(a), self.value(b)
            return va is not None and vb is not None and va.shape == vb.shape and bool((va == vb).all())
        ea, eb = self.raw_producer(a), self.raw_producer(b)
        if depth == 0 or ea is None or eb is None or ea[1] != eb[1]:
            return False
        (ea, _), (eb, _) = ea, eb
        if ea.primitive is not eb.primitive or ea.effects or len(ea.invars) != len(eb.invars):
            return False
        try:
            if ea.params != eb.params:
                return False
        except Exception:  # noqa: BLE001 - params that cannot be compared are not equal
            return False
        return all(self.same(x, y, depth - 1) for x, y in zip(ea.invars, eb.invars))

    def is_output(self, var: Any) -> bool:
        """Whether the value of `var` (or a no-op alias or recomputation of it) is a jaxpr output."""
        var = self.canon(var)
        return any(self.canon(v) is var for v in self.outvars)

    # ---- values --------------------------------------------------------------------------
    def value(self, atom: Any) -> np.ndarray | None:
        """Concrete value of a literal, a constant, or a broadcast of either (also a broadcast of a
        broadcast, as `vmap` adds a batch dim to a constant: `zeros[8, 16]` to [1, 8, 16]); else None."""
        atom = self.canon(atom)
        if C.is_literal(atom):
            return np.asarray(atom.val)
        if atom in self.consts:
            return np.asarray(self.consts[atom])
        eqn = self.producer(atom)
        if eqn is None or eqn.primitive.name not in ("broadcast_in_dim", "convert_element_type", "reshape"):
            return None
        inner = self.value(eqn.invars[0])
        out = eqn.outvars[0].aval
        if inner is not None and inner.size == 1:  # read-only views of the inner entries, no copies
            return np.broadcast_to(inner.reshape(()).astype(out.dtype), out.shape)
        if inner is not None and eqn.primitive.name == "broadcast_in_dim":
            placed = [1] * len(out.shape)
            for i, d in enumerate(eqn.params["broadcast_dimensions"]):
                placed[d] = inner.shape[i]
            return np.broadcast_to(inner.reshape(placed), out.shape)
        return None

    def scalar(self, atom: Any) -> float | None:
        """The single value of a literal or a splat constant (all elements equal), else None."""
        val = self.value(atom)
        if val is None or val.size == 0 or np.iscomplexobj(val):  # a complex value is not a float
            return None
        val = val[tuple(0 if st == 0 else slice(None) for st in val.strides)]  # a broadcast's own entries
        flat = val.reshape(-1)
        first = flat[0]
        if np.isnan(first) if np.issubdtype(flat.dtype, np.floating) else False:
            return float("nan") if np.isnan(flat).all() else None
        return float(first) if (flat == first).all() else None

    def uncast(self, atom: Any) -> Any:
        """The canonical atom, or its operand when it is a float-to-float `convert_element_type`.

        Only a change of float precision is looked through (a rounding); a cast to or from an
        integer or bool changes values and is kept.
        """
        atom = self.canon(atom)
        if self.op(atom) != "convert_element_type":
            return atom
        src = self.args(atom)[0]
        floats = all(jnp.issubdtype(a.aval.dtype, jnp.floating) for a in (src, atom))
        return src if floats else atom

    def is_nonneg_index(self, atom: Any) -> bool:
        """Whether `atom` is an integer index known to be >= 0 (top_k/argsort ids, iota, ...)."""
        atom = self.canon(atom)
        if C.is_literal(atom) or atom in self.consts:
            val = self.value(atom)
            return bool(jnp.issubdtype(val.dtype, jnp.integer) and (val >= 0).all())
        eqn = self.producer(atom)
        if eqn is None:
            return False
        name = eqn.primitive.name
        if name in _NONNEG_INDEX_OPS:
            return True
        if name in ("scatter", "scatter-add", "scatter_add"):  # entries of the operand or (sums of) updates
            return self.is_nonneg_index(eqn.invars[0]) and self.is_nonneg_index(eqn.invars[2])
        if name in ("top_k", "approx_top_k") and self.out_index(atom) == 1:
            return True
        if name == "sort" and self.out_index(atom) >= eqn.params.get("num_keys", 1):
            # a payload of sort (argsort's iota) keeps its values
            return self.is_nonneg_index(eqn.invars[self.out_index(atom)])
        if name in ("broadcast_in_dim", "reshape", "squeeze", "expand_dims", "slice", "transpose", "rev"):
            return self.is_nonneg_index(eqn.invars[0])
        if name == "div":
            n = self.scalar(eqn.invars[1])
            return n is not None and n > 0 and self.is_nonneg_index(eqn.invars[0])
        if name == "concatenate":
            return all(self.is_nonneg_index(v) for v in eqn.invars)
        if name == "gather":  # flat[order]: entries of a non-negative index array, read in bounds
            operand, index = eqn.invars
            if tuple(eqn.params["dimension_numbers"].start_index_map) != (0,):
                return False
            if not self.is_nonneg_index(operand):
                return False
            if "FILL" not in str(eqn.params.get("mode")):  # clip / promise_in_bounds read only real entries
                return True
            bound = self._index_bound(index)  # fill mode: an out-of-bounds read gives INT_MIN
            return bound is not None and bound <= operand.aval.shape[0]
        return False

    def _index_bound(self, atom: Any) -> int | None:
        """n if `atom` is known to hold values < n: argsort's permutation (an iota sorted along)."""
        eqn = self.producer(self.canon(atom))
        while eqn is not None and eqn.primitive.name in ("broadcast_in_dim", "reshape", "expand_dims"):
            eqn = self.producer(self.canon(eqn.invars[0]))
        if eqn is None or eqn.primitive.name != "sort" or eqn.params.get("num_keys") != 1:
            return None
        payload = self.producer(self.canon(eqn.invars[1]))
        dim = eqn.params["dimension"]
        if payload is None or payload.primitive.name != "iota" or payload.params["dimension"] != dim:
            return None
        return eqn.invars[1].aval.shape[dim]

    def _floor_div_of_nonneg(self, eqn: C.JaxprEqn) -> Any | None:
        """For jnp's integer floor division `a // n` of a >= 0 by a literal n > 0: the plain `div`."""
        if len(eqn.invars) != 3:
            return None
        _, q, q_minus_1 = eqn.invars
        qe, me = self.raw_producer(q), self.raw_producer(q_minus_1)
        if qe is None or me is None or qe[0].primitive.name != "div" or me[0].primitive.name != "sub":
            return None
        if me[0].invars[0] is not q or self.scalar(me[0].invars[1]) != 1:
            return None
        n = self.scalar(qe[0].invars[1])
        return q if n is not None and n > 0 and self.is_nonneg_index(qe[0].invars[0]) else None

    def _times_one(self, eqn: C.JaxprEqn) -> Any | None:
        """For x * 1 of x's own type: x (exact in IEEE arithmetic, NaN, inf and -0 included)."""
        a, b = eqn.invars
        for one, x in ((a, b), (b, a)):
            if self.scalar(one) == 1.0 and not C.is_literal(x) and _same_aval(x, eqn.outvars[0]):
                return x
        return None

    def _bool_round_trip(self, eqn: C.JaxprEqn) -> Any | None:
        """For a bool b cast to numbers and compared back (`b.astype(f) > 0`, `!= 0`, `== 1`, `0 < ...`,
        as `jnp.where(one_hot(ids, E) > 0, ...)` writes it): b (the cast holds only 0 and 1)."""
        a, c = eqn.invars
        name = eqn.primitive.name
        for cast, const, op in ((a, c, name), (c, a, _SWAPPED.get(name))):
            if C.is_literal(cast) or self.scalar(const) != _BOOL_TRUE_WHEN.get(op, (None,))[0]:
                continue
            got = self.raw_producer(self._rep.get(cast, cast))
            if got is None or got[0].primitive.name != "convert_element_type":
                continue
            b = got[0].invars[0]
            if not C.is_literal(b) and b.aval.dtype == jnp.bool_ and _same_aval(b, eqn.outvars[0]):
                return b
        return None

    def _clip_at_zero_of_nonneg(self, eqn: C.JaxprEqn) -> Any | None:
        """For max(0, a) with a >= 0 provably (jnp.bincount's clip): a."""
        a, b = eqn.invars
        for zero, x in ((a, b), (b, a)):
            if self.scalar(zero) == 0 and not C.is_literal(x) and self.is_nonneg_index(x):
                return x
        return None

    def _normalised_index(self, eqn: C.JaxprEqn) -> Any | None:
        """For `select_n(i < 0, i, i + n)` with i >= 0 provably, return i."""
        if len(eqn.invars) != 3:
            return None
        pred, on_false, on_true = eqn.invars
        pe = self.raw_producer(pred)
        te = self.raw_producer(on_true)
        if pe is None or te is None or pe[0].primitive.name != "lt" or te[0].primitive.name != "add":
            return None
        if pe[0].invars[0] is not on_false or self.scalar(pe[0].invars[1]) != 0:
            return None
        if on_false not in te[0].invars:
            return None
        return on_false if self.is_nonneg_index(on_false) else None


def live_equations(jaxpr: C.Jaxpr) -> set[int]:
    """Indices of the equations whose results reach an output of `jaxpr`, or that have effects."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, _Literal)}
    live: set[int] = set()
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        if eqn.effects or any(v in needed for v in eqn.outvars):  # a dropvar is never needed
            live.add(i)
            needed.update(v for v in eqn.invars if not isinstance(v, _Literal))
    return live


def _atom_key(atom: Any) -> Any:
    """A hashable key for an operand: the var itself, or a literal's dtype, shape and bytes."""
    if not C.is_literal(atom):
        return atom
    val = np.asarray(atom.val)
    return "literal", str(val.dtype), val.shape, val.tobytes()


def _freeze(obj: Any) -> Any:
    """A hashable, comparable form of equation params (arrays by value)."""
    if isinstance(obj, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return "array", str(obj.dtype), obj.shape, obj.tobytes()
    return obj


def _same_aval(a: Any, b: Any) -> bool:
    if a is None:
        return False
    aa, bb = a.aval, b.aval
    return getattr(aa, "shape", None) == getattr(bb, "shape", None) and getattr(aa, "dtype", None) == getattr(
        bb, "dtype", None
    )
