"""The canonical view of one flat jaxpr, used only to *find* matches (the rewrite uses the original).

It answers questions about values (jaxpr atoms) while looking through spelling noise:
no-op casts/reshapes/broadcasts, `copy`, `pvary`, index normalisation of non-negative indices
(`select_n(i < 0, i, i + n)`), and, where asked, `stop_gradient`::

    view = View(closed_jaxpr)
    eqn = view.producer(var)           # the equation that makes var (noise skipped)
    view.op(var), view.args(var)       # its primitive name and canonical inputs
    view.users(var)                    # equations consuming var (looking through noise)
    view.scalar(atom)                  # python float of a literal / splat constant, else None

Idiom recognisers (softmax, sigmoid, one_hot, take_along_axis, ...) live in `moefuse.idioms`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax.numpy as jnp
import numpy as np

from moefuse import _compat as C

# Primitives that never change a value (when their output aval equals their input aval).
_SHAPE_NOOPS = frozenset({"convert_element_type", "reshape", "broadcast_in_dim", "squeeze", "expand_dims"})
_ALWAYS_NOOPS = frozenset({"copy", "copy_p", "pvary", "pbroadcast"})
_NONNEG_INDEX_OPS = frozenset({"iota", "argmax", "argmin"})


class View:
    """Canonical, read-only view over a flat ClosedJaxpr."""

    def __init__(self, closed: C.ClosedJaxpr):
        self.closed = closed
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

    # ---- raw structure -------------------------------------------------------------------
    def eqn_index(self, var: Any) -> int | None:
        """Index of the equation producing `var` (raw, no canonicalisation)."""
        if C.is_literal(var) or var not in self._producer:
            return None
        return self._producer[var][0]

    def raw_users(self, var: Any) -> list[int]:
        return [] if C.is_literal(var) else self._raw_users.get(var, [])

    def raw_producer(self, var: Any) -> tuple[C.JaxprEqn, int] | None:
        if C.is_literal(var) or var not in self._producer:
            return None
        i, j = self._producer[var]
        return self.jaxpr.eqns[i], j

    # ---- canonical structure -------------------------------------------------------------
    def canon(self, atom: Any, *, through_stop_gradient: bool = False) -> Any:
        """`atom` with value-preserving noise stripped (the var whose value it is)."""
        while True:
            got = self.raw_producer(atom)
            if got is None:
                return atom
            eqn, _ = got
            name = eqn.primitive.name
            src = eqn.invars[0] if eqn.invars else None
            if name in _ALWAYS_NOOPS or (name == "stop_gradient" and through_stop_gradient):
                atom = src
            elif name in _SHAPE_NOOPS and _same_aval(src, eqn.outvars[0]):
                atom = src
            elif name == "select_n" and (idx := self._normalised_index(eqn)) is not None:
                atom = idx
            elif name == "select_n" and (q := self._floor_div_of_nonneg(eqn)) is not None:
                atom = q
            elif name == "max" and self._clip_at_zero_of_nonneg(eqn) is not None:
                atom = self._clip_at_zero_of_nonneg(eqn)
            else:
                return atom

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
        """Equations that consume the value of `var`, looking forward through no-op equations."""
        out: list[C.JaxprEqn] = []
        for i in self.raw_users(var):
            eqn = self.jaxpr.eqns[i]
            nxt = eqn.outvars[0] if len(eqn.outvars) == 1 else None
            if nxt is not None and not C.is_dropvar(nxt) and self.canon(nxt) is var:
                out.extend(self.users(nxt))
            else:
                out.append(eqn)
        return out

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
        """Whether `var` (or a no-op alias of it) is an output of the jaxpr."""
        return any(self.canon(v) is var for v in self.outvars)

    # ---- values --------------------------------------------------------------------------
    def value(self, atom: Any) -> np.ndarray | None:
        """Concrete value of a literal, a constant, or a broadcast of either; else None."""
        atom = self.canon(atom)
        if C.is_literal(atom):
            return np.asarray(atom.val)
        if atom in self.consts:
            return np.asarray(self.consts[atom])
        eqn = self.producer(atom)
        if eqn is not None and eqn.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape"):
            inner = self.value(eqn.invars[0])
            if inner is not None and inner.size == 1:
                return np.full(eqn.outvars[0].aval.shape, inner.reshape(()), eqn.outvars[0].aval.dtype)
        return None

    def scalar(self, atom: Any) -> float | None:
        """The single value of a literal or a splat constant (all elements equal), else None."""
        val = self.value(atom)
        if val is None or val.size == 0:
            return None
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
        eqn = self.producer(atom)
        if eqn is None:
            return False
        name = eqn.primitive.name
        if name in _NONNEG_INDEX_OPS:
            return True
        if name in ("top_k", "approx_top_k") and self.out_index(atom) == 1:
            return True
        if name == "sort" and self.out_index(atom) >= eqn.params.get("num_keys", 1):
            # a payload of sort (argsort's iota) keeps its values
            return self.is_nonneg_index(eqn.invars[self.out_index(atom)])
        if name in ("broadcast_in_dim", "reshape", "squeeze", "expand_dims", "slice", "transpose"):
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


def _same_aval(a: Any, b: Any) -> bool:
    if a is None:
        return False
    aa, bb = a.aval, b.aval
    return getattr(aa, "shape", None) == getattr(bb, "shape", None) and getattr(aa, "dtype", None) == getattr(
        bb, "dtype", None
    )
