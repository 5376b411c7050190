"""Matching machinery shared by all patterns: proposals, regions, and the safety checks.

A pattern anchors on a rare equation (e.g. `top_k`), grows along data flow in a `View`, and
returns a `Proposal` (the interface: input and output vars, bound params, how to emit the
fused op) or a `NoMatch` with the reason. The engine then computes the region (every equation
between the inputs and the outputs) and checks that rewriting it cannot change meaning::

    region = region_of(view, proposal.inputs, proposal.outputs)
    reason = region_problem(view, region, proposal)     # None when safe
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from moefuse import _compat as C
from moefuse.view import View

Emit = Callable[..., Sequence[Any]]  # emit(kernel_name, *input_values) -> output values


@dataclasses.dataclass
class Proposal:
    """A candidate rewrite found by a pattern."""

    op: str
    anchor: int  # index of the anchor equation (for the location)
    inputs: list[Any]  # vars the fused op reads, in emit order
    outputs: list[Any]  # vars the fused op defines, in emit order
    params: dict[str, Any]  # bound parameters, as plain data for the Plan
    emit: Emit
    expose: Callable[[list[Any]], Proposal | None] | None = None
    """Given interior vars used outside the region, a proposal that also outputs them (or None)."""
    notes: tuple[str, ...] = ()  # what the Plan should say about how the site was read


@dataclasses.dataclass
class NoMatch:
    """An anchor that did not become a rewrite; `reason` is shown to users."""

    anchor: int
    reason: str
    op: str


class Pattern(Protocol):
    """What the engine needs from a pattern module."""

    op: str

    def anchors(self, view: View) -> Iterable[int]: ...

    def match(self, view: View, anchor: int) -> Proposal | NoMatch: ...


def region_of(view: View, inputs: Sequence[Any], outputs: Sequence[Any]) -> set[int]:
    """Equations on a data path from `inputs` to `outputs` (constant-only equations excluded).

    An input stands for its value: a no-op alias or a recomputation of it (the same value in the
    view's normal form) is read as that input, not computed inside the region.
    """
    stop = canonical_set(view, inputs)
    seen: set[int] = set()
    stack = [v for v in outputs if not C.is_literal(v)]
    while stack:
        var = stack.pop()
        if reads_input(view, var, stop):
            continue
        i = view.eqn_index(var)
        if i is None or i in seen:
            continue
        seen.add(i)
        stack.extend(v for v in view.jaxpr.eqns[i].invars if not C.is_literal(v))
    memo: dict[int, bool] = {}  # shared: whether an equation depends on `stop` does not depend on who asks
    return {i for i in seen if _depends_on(view, i, stop, memo)}


def canonical_set(view: View, atoms: Iterable[Any]) -> set[Any]:
    """The canonical vars of `atoms` (literals, and vars whose value is a literal, left out)."""
    return {c for v in atoms if not C.is_literal(v) and not C.is_literal(c := view.canon(v))}


def reads_input(view: View, var: Any, inputs: set[Any]) -> bool:
    """Whether `var` is one of `inputs` (a `canonical_set`), or the same value in normal form."""
    if isinstance(var, C.Literal):
        return False
    c = view.canon(var)
    return var in inputs or (not isinstance(c, C.Literal) and c in inputs)


def _depends_on(view: View, i: int, inputs: set[Any], memo: dict[int, bool]) -> bool:
    if i in memo:
        return memo[i]
    memo[i] = False
    result = False
    for v in view.jaxpr.eqns[i].invars:
        if C.is_literal(v):
            continue
        if reads_input(view, v, inputs):
            result = True
            break
        j = view.eqn_index(v)
        if j is not None and _depends_on(view, j, inputs, memo):
            result = True
            break
    memo[i] = result
    return result


def region_problem(view: View, region: set[int], prop: Proposal) -> str | None:
    """Why rewriting `region` could change meaning, or None when it is safe."""
    if not region:
        return "empty region"
    outputs = set(prop.outputs)
    inputs = canonical_set(view, prop.inputs)
    produced: set[Any] = set()
    for i in sorted(region):
        eqn = view.jaxpr.eqns[i]
        if eqn.effects:
            return f"`{eqn.primitive.name}` inside the region has side effects"
        if any(True for _ in C.sub_jaxprs(eqn)) and eqn.primitive.name not in C.CUSTOM_JVP_NAMES:
            return f"`{eqn.primitive.name}` with a body inside the region"
        produced.update(v for v in eqn.outvars if not C.is_dropvar(v))
    for i in sorted(region):
        for v in view.jaxpr.eqns[i].invars:
            if C.is_literal(v) or v in produced or reads_input(view, v, inputs) or v in view.consts:
                continue
            if is_constant(view, v):
                continue  # a constant computed in the program (iota, zeros): kept as is
            return f"the region also reads {_describe(v)}, which the fused op does not take"
    for var in produced - outputs:
        outside = [j for j in view.raw_users(var) if j not in region]
        if outside or var in view.outvars:
            user = view.jaxpr.eqns[outside[0]] if outside else None
            where = f"by `{user.primitive.name}` at {_loc(user)}" if user else "as a program output"
            return f"interior value {_describe(var)} is also used outside {prop.op} ({where})"
    return None


def is_constant(view: View, var: Any, _memo: dict[Any, bool] | None = None) -> bool:
    """Whether `var` is computed from literals and constants only (iota, zeros, ...)."""
    memo = {} if _memo is None else _memo
    if C.is_literal(var) or var in view.consts:
        return True
    if var in memo:
        return memo[var]
    i = view.eqn_index(var)
    eqn = None if i is None else view.jaxpr.eqns[i]
    memo[var] = eqn is not None and not eqn.effects and all(is_constant(view, v, memo) for v in eqn.invars)
    return memo[var]


def escaping(view: View, region: set[int], outputs: Sequence[Any]) -> list[Any]:
    """Interior vars of `region` that are used outside it (not counting `outputs`)."""
    outs = set(outputs)
    found = []
    for i in sorted(region):
        for v in view.jaxpr.eqns[i].outvars:
            if C.is_dropvar(v) or v in outs:
                continue
            if v in view.outvars or any(j not in region for j in view.raw_users(v)):
                found.append(v)
    return found


def _describe(var: Any) -> str:
    aval = var.aval
    return f"{aval.str_short() if hasattr(aval, 'str_short') else aval}"


def _loc(eqn: C.JaxprEqn) -> str:
    f, line, _ = C.eqn_location(eqn)
    return f"{C.relpath(f)}:{line}"
