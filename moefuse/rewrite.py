"""The rewriting interpreter: analyse a jaxpr (recursively), then re-evaluate it with fused ops.

`analyse` walks a ClosedJaxpr and every body of its higher-order equations (`jit`, `scan`,
`while`, `cond`, `remat`, `shard_map`, `custom_jvp_call`, `custom_vjp_call`), asks the
patterns for matches, checks them, and returns a `Level` tree. `evaluate` re-binds the
equations of a Level on concrete values or tracers, emitting the fused op for each match and
rebuilding bodies that contain matches::

    level = analyse(closed_jaxpr, select.target_for("cpu"))
    outs = evaluate(level, flat_args)      # inside jax.jit: the rewritten program
    level.sites(), level.declines()        # what the Plan shows

Never fail where `jax.jit` works: an error inside the pass for one site declines that site (its
reason is the error, in one line); an error that prevents analysing a body leaves that body as
written (and says so in the Plan); an error while emitting a fused op at trace time runs the
site's original equations instead. `MOEFUSE_STRICT=1` raises instead, for debugging the pass.
Bodies are analysed and re-traced in their own context (a `shard_map` body under its mesh axes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moefuse import _compat as C
from moefuse import _testing, select
from moefuse.emit_key import emit_key
from moefuse.match import NoMatch, Proposal, escaping, region_of, region_problem
from moefuse.plan import Decline, Site
from moefuse.view import Bound, View, live_equations

log = logging.getLogger("moefuse")


@dataclasses.dataclass
class Match:
    proposal: Proposal
    region: set[int]  # indices into the Level's jaxpr
    kernel: select.Kernel
    site: Site


@dataclasses.dataclass(frozen=True)
class Inlined:
    """The matching jaxpr (custom_vjp calls replaced by their primal bodies) against the jaxpr
    that is evaluated: `origin[j]` is the evaluated equation that matching equation j comes from."""

    flat: C.ClosedJaxpr
    origin: list[int]

    @functools.cached_property
    def _members(self) -> dict[int, list[int]]:
        """evaluated equation -> the matching equations that come from it"""
        out: dict[int, list[int]] = {}
        for j, i in enumerate(self.origin):
            out.setdefault(i, []).append(j)
        return out

    @functools.cached_property
    def _known(self) -> set[Any]:
        """the variables of the evaluated jaxpr"""
        j = self.flat.jaxpr
        return {*j.invars, *j.constvars, *(v for e in j.eqns for v in e.outvars)}

    def calls(self, region: set[int]) -> set[int]:
        """`region` grown to whole inlined calls (a call is replaced whole or not at all)."""
        return {j for i in self.evaluated(region) for j in self._members[i]}

    def evaluated(self, region: set[int]) -> set[int]:
        return {self.origin[j] for j in region}

    def foreign(self, atoms: Sequence[Any]) -> Any | None:
        """The first of `atoms` that exists only inside an inlined body (not in the evaluated jaxpr)."""
        return next((v for v in atoms if not C.is_literal(v) and v not in self._known), None)

    def rules_replaced(self, region: set[int]) -> list[str]:
        eqns = self.flat.jaxpr.eqns
        return sorted(
            {
                C.custom_rule_name(eqns[i])
                for i in self.evaluated(region)
                if eqns[i].primitive.name in C.CUSTOM_VJP_NAMES
            }
        )


@dataclasses.dataclass
class Level:
    """One jaxpr and what happens in it."""

    closed: C.ClosedJaxpr  # the jaxpr to evaluate (jit-inlined when it has matches)
    matches: list[Match]
    subs: dict[int, dict[tuple[str, int | None], Level]]  # eqn index -> bodies (rebuilt if changed)
    declined: list[Decline]
    changed: bool
    order: list[Any] | None = None  # evaluation schedule when matches exist

    def sites(self) -> list[Site]:
        out = [m.site for m in self.matches]
        for bodies in self.subs.values():
            for sub in bodies.values():
                out.extend(sub.sites())
        return out

    def declines(self) -> list[Decline]:
        out = list(self.declined)
        for bodies in self.subs.values():
            for sub in bodies.values():
                out.extend(sub.declines())
        return out


def strict() -> bool:
    """Whether `MOEFUSE_STRICT` asks internal errors of the pass to be raised, not declined."""
    return os.environ.get("MOEFUSE_STRICT", "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """An exception as one line: `Type: first line of the message`."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _tracing_in(enclosing: Sequence[C.JaxprEqn]) -> Iterator[None]:
    """The context to trace a body nested in `enclosing` equations (outermost first)."""
    with contextlib.ExitStack() as stack:
        for eqn in enclosing:
            stack.enter_context(C.body_trace_context(eqn))
        yield


def analyse(
    closed: C.ClosedJaxpr,
    target: select.Target,
    path: str = "",
    enclosing: Sequence[C.JaxprEqn] = (),
    bound: Sequence[Bound | None] = (),
) -> Level:
    """Find and check every match in `closed` and its bodies.

    `enclosing` are the equations whose bodies `closed` is nested in (outermost first): tracing
    done for the analysis runs in their context (a shard_map's mesh axes). `bound` says what
    `closed`'s inputs are bound to outside, where the body runs once on its equation's operands
    (`View.outside`). An error that stops the analysis leaves `closed` as written, with a Decline
    saying why.
    """
    try:
        with _tracing_in(enclosing):
            return _analyse(closed, target, path, tuple(enclosing), bound)
    except Exception as e:  # noqa: BLE001 - never fail where jax.jit works
        if strict():
            raise
        log.warning("moefuse: could not analyse %s; left as written", path or "the program", exc_info=True)
        where = enclosing[-1] if enclosing else None
        reason = f"internal error analysing {path or 'the program'}, left as written ({one_line(e)})"
        decline = _decline("*", where, reason, path) if where is not None else Decline("*", "?", reason)
        return Level(closed, [], {}, [decline], False)


def _analyse(
    closed: C.ClosedJaxpr, target: select.Target, path: str, enclosing: tuple, bound: Sequence[Bound | None]
) -> Level:
    from moefuse.patterns import PATTERNS

    flat = inline_jits(closed) if _needs_inlining(closed.jaxpr) else closed
    seen, origin = C.inline_custom_vjps(flat, inline_jits)
    inlined = Inlined(flat, origin)
    view = View(seen, bound)
    matches: list[Match] = []
    declined: list[Decline] = []
    claimed: set[int] = set()  # matching-jaxpr indices of fused regions
    for pattern in PATTERNS:
        try:
            anchors = sorted(pattern.anchors(view), reverse=True)
        except Exception as e:  # noqa: BLE001 - a pattern bug must never break the user's program
            if strict():
                raise
            log.warning("moefuse: the %s pattern failed to scan a jaxpr", pattern.op, exc_info=True)
            declined.append(
                Decline(
                    pattern.op,
                    "?",
                    f"internal error scanning for {pattern.op} sites ({one_line(e)})",
                    path=path,
                )
            )
            continue
        log.debug("%s pattern%s: %d anchor(s) at equations %s", pattern.op, _in(path), len(anchors), anchors)
        for anchor in anchors:
            if anchor in claimed:
                log.debug("%s pattern: equation %d is in a region already fused, skipped", pattern.op, anchor)
                continue
            got = _try_safely(view, inlined, pattern, anchor, target, path, claimed)
            if isinstance(got, tuple):
                got, seen_region = got
                matches.append(got)
                claimed |= seen_region
            else:
                declined.append(got)
                log.info("declined %s at %s: %s", got.op, got.location, got.reason)
    matches.sort(key=lambda m: m.proposal.anchor)  # the Plan lists sites in program order
    order = _schedule(flat.jaxpr, matches) if matches else None
    base = flat if matches else closed
    fused = set().union(*(m.region for m in matches))
    # `view` names the values of `flat`; bodies of `closed` are bound to values of `closed`
    outer = (lambda: view) if base is flat else functools.cache(lambda: View(base))
    subs = _analyse_bodies(base, target, path, fused, enclosing, outer)
    changed = bool(matches) or any(sub.changed for b in subs.values() for sub in b.values())
    if not changed and not _testing.retracing_all():
        return Level(closed, [], subs, declined, False)
    return Level(base, matches, subs, declined, True, order)


def _try_safely(
    view: View,
    inlined: Inlined,
    pattern: Any,
    anchor: int,
    target: select.Target,
    path: str,
    claimed: set[int],
) -> tuple[Match, set[int]] | Decline:
    """`_try`, with any internal error declining this site (the error is the reason)."""
    try:
        return _try(view, inlined, pattern, anchor, target, path, claimed)
    except Exception as e:  # noqa: BLE001 - a pass bug must never break the user's program
        if strict():
            raise
        log.debug("pattern %s failed at equation %d", pattern.op, anchor, exc_info=True)
        reason = f"internal error in the {pattern.op} pattern, left unfused ({one_line(e)})"
        return _decline(pattern.op, view.jaxpr.eqns[anchor], reason, path)


def _try(
    view: View,
    inlined: Inlined,
    pattern: Any,
    anchor: int,
    target: select.Target,
    path: str,
    claimed: set[int],
) -> tuple[Match, set[int]] | Decline:
    """(the match, its region in the matching jaxpr), or why the anchor is declined."""
    eqn = view.jaxpr.eqns[anchor]
    log.debug("trying the %s pattern at equation %d (%s)%s", pattern.op, anchor, eqn.primitive, _in(path))
    got = pattern.match(view, anchor)
    if isinstance(got, NoMatch):
        return _decline(got.op, eqn, got.reason, path)
    prop: Proposal = got
    region = region_of(view, prop.inputs, prop.outputs)
    leaks = escaping(view, region, prop.outputs)
    if leaks and prop.expose is not None:
        wider = prop.expose(leaks)
        if wider is not None:
            prop = wider
            region = region_of(view, prop.inputs, prop.outputs)
    region = inlined.calls(region)
    inside = inlined.foreign([*prop.inputs, *prop.outputs])
    reason = (
        None if inside is None else f"the fused op would read or define {inside} inside a custom_vjp body"
    )
    reason = reason or region_problem(view, region, prop)
    if reason is None and region & claimed:
        reason = "overlaps a region already fused"
    if reason is None and not _convex(view, region):
        reason = "the region's outputs feed back into its own inputs through the rest of the program"
    choice = None
    if reason is None:
        choice = select.choose(
            select.Request(prop.op, prop.params, tuple(_sds(v) for v in prop.inputs)), target
        )
        if choice.kernel is None:
            reason = choice.reason
    if reason is None:
        reason = _type_problem(prop, choice.kernel)
    if reason is not None:
        return _decline(prop.op, eqn, reason, path)
    file, line, _ = C.eqn_location(eqn)
    rules = inlined.rules_replaced(region)
    site = Site(
        op=prop.op,
        location=f"{C.relpath(file)}:{line}",
        kernel=choice.kernel.impl,
        params={**prop.params, "replaces_custom_vjp": rules} if rules else prop.params,
        tiles=dict(choice.kernel.tiles),
        fallbacks=choice.fallbacks,
        scope=C.eqn_scope(eqn),
        source=_source_line(file, line),
        path=path,
        notes=prop.notes,
    )
    log.info("fused %s at %s with %s", prop.op, site.location, choice.kernel)
    return Match(prop, inlined.evaluated(region), choice.kernel, site), region


def _in(path: str) -> str:
    return f" in {path}" if path else ""


def _convex(view: View, region: set[int]) -> bool:
    """No path leaves `region` and comes back into it (so it can run as one op)."""
    last = max(region)
    stack = [
        j
        for i in region
        for v in view.jaxpr.eqns[i].outvars
        if not C.is_dropvar(v)
        for j in view.raw_users(v)
        if j not in region and j < last
    ]
    seen: set[int] = set()
    while stack:
        j = stack.pop()
        if j in seen:
            continue
        seen.add(j)
        for v in view.jaxpr.eqns[j].outvars:
            for u in [] if C.is_dropvar(v) else view.raw_users(v):
                if u in region:
                    return False
                if u < last:
                    stack.append(u)
    return True


def _type_problem(prop: Proposal, kernel: select.Kernel) -> str | None:
    """The fused op (with the chosen kernel) must build and give exactly the original outputs'
    shapes and dtypes. Sites whose emits are the same function of inputs of the same types
    (`emit_key`: a model's identical layers) share one check."""
    key = emit_key(prop.emit)
    if key is None:
        return _build_problem(prop, kernel)
    key = (key, kernel, tuple(v.aval for v in (*prop.inputs, *prop.outputs)))
    if key not in _TYPE_CHECKED:
        if len(_TYPE_CHECKED) >= 4096:
            _TYPE_CHECKED.clear()
        _TYPE_CHECKED[key] = _build_problem(prop, kernel)
    return _TYPE_CHECKED[key]


_TYPE_CHECKED: dict[Any, str | None] = {}


def _build_problem(prop: Proposal, kernel: select.Kernel) -> str | None:
    """`_type_problem` for one site: build the fused op abstractly (`jax.eval_shape`)."""
    try:
        outs = jax.eval_shape(lambda *a: list(prop.emit(kernel, *a)), *[_sds(v) for v in prop.inputs])
    except Exception as e:  # noqa: BLE001 - any failure means we cannot prove equality
        if strict():
            raise
        return f"fused op cannot be built for these inputs: {one_line(e)}"
    for got, var in zip(outs, prop.outputs):
        want = var.aval
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            return (
                f"fused op would give {got.dtype}{list(got.shape)} where the program has {want.str_short()}"
            )
    return None


def _sds(var: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype)


def _decline(op: str, eqn: C.JaxprEqn, reason: str, path: str) -> Decline:
    """A Decline located at `eqn`'s user source line."""
    file, line, _ = C.eqn_location(eqn)
    return Decline(
        op=op,
        location=f"{C.relpath(file)}:{line}",
        reason=reason,
        scope=C.eqn_scope(eqn),
        source=_source_line(file, line),
        path=path,
    )


def _source_line(file: str, line: int) -> str:
    import linecache

    return linecache.getline(file, line).strip() if line else ""


def _schedule(jaxpr: C.Jaxpr, matches: list[Match]) -> list[Any]:
    """Topological order of units (equation indices and matches), original order preferred.

    Each match is one unit ("m", n); every other live equation is ("e", index): dead code is
    dropped (it may read a region's interior values, which the fused op does not define). Matches
    are convex (checked in `_try`), so the graph has no cycle. Among the units ready to run, the one
    whose first equation comes first in `jaxpr` runs first (Kahn's algorithm on a heap).
    """
    owner = {i: m_i for m_i, m in enumerate(matches) for i in m.region}
    live = sorted(live_equations(jaxpr) | set(owner))
    unit_of_eqn = {i: ("m", owner[i]) if i in owner else ("e", i) for i in live}
    key: dict[Any, int] = {}  # unit -> index of its first equation (unique per unit)
    unit_of_var: dict[Any, Any] = {}
    for i in live:
        key.setdefault(unit_of_eqn[i], i)
        for v in jaxpr.eqns[i].outvars:
            unit_of_var[v] = unit_of_eqn[i]
    reads = [(unit_of_eqn[i], jaxpr.eqns[i].invars) for i in live]
    reads += [(("m", m_i), m.proposal.inputs) for m_i, m in enumerate(matches)]
    after: dict[Any, set[Any]] = {unit: set() for unit in key}
    for unit, invars in reads:
        for v in invars:
            src = None if C.is_literal(v) else unit_of_var.get(v)
            if src is not None and src != unit:
                after[src].add(unit)
    waiting = dict.fromkeys(key, 0)
    for users in after.values():
        for unit in users:
            waiting[unit] += 1
    ready = [(key[unit], unit) for unit, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, unit = heapq.heappop(ready)
        order.append(unit)
        for user in after[unit]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (key[user], user))
    if len(order) != len(key):
        raise RuntimeError("fused regions and the equations around them form a cycle")
    return order


def _analyse_bodies(
    closed: C.ClosedJaxpr,
    target: select.Target,
    path: str,
    skip: set[int],
    enclosing: tuple,
    outer: Callable[[], View],
) -> dict:
    """The Level of every body of `closed`'s equations outside `skip`; `outer()` is a view of
    `closed` (what bodies bound once to their equation's operands see outside)."""
    subs: dict[int, dict[tuple[str, int | None], Level]] = {}
    for i, eqn in enumerate(closed.jaxpr.eqns):
        if i in skip:
            continue
        for key, idx, body in C.sub_jaxprs(eqn):
            name = eqn.primitive.name + ("" if key in ("jaxpr", "call_jaxpr") else f".{key}")
            name += "" if idx is None else f"[{idx}]"
            body = C.as_closed(body)
            once = eqn.primitive.name in C.BOUND_ONCE_NAMES and len(body.jaxpr.invars) == len(eqn.invars)
            bound = [None if C.is_literal(v) else Bound(outer, v) for v in eqn.invars] if once else []
            subs.setdefault(i, {})[(key, idx)] = analyse(
                body, target, f"{path}/{name}" if path else name, (*enclosing, eqn), bound
            )
    return subs


def _needs_inlining(jaxpr: C.Jaxpr) -> bool:
    """Whether `inline_jits` changes `jaxpr` (beyond new vars): it has a nested `jit`, or removes
    unit dims from the result of an elementwise op or of a broadcast (`_removes_unit_dims`)."""
    return any(e.primitive.name in C.JIT_NAMES for e in jaxpr.eqns) or _removes_unit_dims(jaxpr)


def _removes_unit_dims(jaxpr: C.Jaxpr) -> bool:
    """Whether an equation of `jaxpr` removes unit dims from the result of an elementwise op or of a
    broadcast (what `_UnitDims` reads through)."""
    made = {v: e for e in jaxpr.eqns for v in e.outvars}
    for eqn in jaxpr.eqns:
        src = made.get(eqn.invars[0]) if eqn.invars and not C.is_literal(eqn.invars[0]) else None
        if src is not None and _removed_unit_dims(eqn) is not None and _recorded(src):
            return True
    return False


def inline_jits(closed: C.ClosedJaxpr) -> C.ClosedJaxpr:
    """`closed` with every nested `jit` equation inlined (bodies of other primitives untouched), and
    unit dims removed from an elementwise op's result read as the op of the unexpanded operands
    (`_UnitDims`): the same values, bit for bit, in a normal form for matching. Every var of the
    result is new, so one body can be inlined in several places.

    The jits are spliced in as they are (no tracing); only a program with unit dims to remove is
    traced again, through `_UnitDims`."""
    flat = _spliced(closed)
    if not _removes_unit_dims(flat.jaxpr):
        return flat
    unit_dims = _UnitDims()

    def run(*args: Any) -> list[Any]:
        return _eval_reading_unit_dims(flat.jaxpr, flat.consts, args, unit_dims)

    return C.trace_to_closed_jaxpr(run, [v.aval for v in flat.jaxpr.invars])


def _spliced(closed: C.ClosedJaxpr) -> C.ClosedJaxpr:
    """`closed` with the equations of each nested `jit` body in place of the `jit` equation (its
    constants become constants of the result), every var new; no tracing."""
    constvars: list[Any] = []
    consts: list[Any] = []
    eqns: list[C.JaxprEqn] = []

    def splice(jaxpr: C.Jaxpr, body_consts: Sequence[Any], env: dict[Any, Any]) -> list[Any]:
        for var, val in zip(jaxpr.constvars, body_consts):
            env[var] = C.Var(var.aval)
            constvars.append(env[var])
            consts.append(val)
        sub = lambda vs: [v if C.is_literal(v) else env[v] for v in vs]
        for eqn in jaxpr.eqns:
            invars = sub(eqn.invars)
            if eqn.primitive.name in C.JIT_NAMES:
                body = C.as_closed(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
                outs = splice(body.jaxpr, body.consts, dict(zip(body.jaxpr.invars, invars)))
                env.update((v, out) for v, out in zip(eqn.outvars, outs) if not C.is_dropvar(v))
                continue
            outvars = [v if C.is_dropvar(v) else C.Var(v.aval) for v in eqn.outvars]
            env.update((v, new) for v, new in zip(eqn.outvars, outvars) if not C.is_dropvar(v))
            eqns.append(eqn.replace(invars=invars, outvars=outvars))
        return sub(jaxpr.outvars)

    j = closed.jaxpr
    invars = [C.Var(v.aval) for v in j.invars]
    outvars = splice(j, closed.consts, dict(zip(j.invars, invars)))
    return C.ClosedJaxpr(C.Jaxpr(constvars, invars, outvars, eqns, j.effects, j.debug_info), consts)


def _eval_reading_unit_dims(
    jaxpr: C.Jaxpr, consts: Sequence[Any], args: Sequence[Any], unit_dims: _UnitDims
) -> list[Any]:
    """Evaluate `jaxpr` (no nested `jit`: `_spliced`) binding each equation through `unit_dims`."""
    env: dict[Any, Any] = {}
    _write(env, jaxpr.constvars, consts)
    _write(env, jaxpr.invars, args)
    for eqn in jaxpr.eqns:
        _write(env, eqn.outvars, unit_dims.bind(eqn, [_read(env, v) for v in eqn.invars]))
    return [_read(env, v) for v in jaxpr.outvars]


# Elementwise primitives whose params do not depend on the shape: with every operand reshaped by
# the same removal of unit dims (a rank-0 operand as it is), each output element is computed from
# the same operand elements, so the result is the removal applied to the original result, exactly.
_ELEMENTWISE = frozenset(
    {
        *("neg", "sign", "floor", "ceil", "round", "is_finite", "abs", "not", "exp", "exp2", "log"),
        *("log1p", "expm1", "logistic", "tanh", "sin", "cos", "tan", "sqrt", "rsqrt", "cbrt", "erf"),
        *("erfc", "erf_inv", "square", "integer_pow", "convert_element_type", "reduce_precision"),
        *("add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter"),
        *("and", "or", "xor", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "clamp"),
    }
)


def _is_elementwise(eqn: C.JaxprEqn) -> bool:
    return eqn.primitive.name in _ELEMENTWISE and eqn.params.get("sharding") is None


def _recorded(eqn: C.JaxprEqn) -> bool:
    """Whether `_UnitDims` can remove unit dims from `eqn`'s result through `eqn`."""
    name = eqn.primitive.name
    shaping = name in ("broadcast_in_dim", "reshape") and eqn.params.get("sharding") is None
    return _is_elementwise(eqn) or (shaping and eqn.params.get("dimensions") is None)


def _removed_unit_dims(eqn: C.JaxprEqn) -> tuple[int, ...] | None:
    """The unit dims of its operand that `eqn` removes, if that is all it does (a `squeeze`, or a
    `reshape` to the operand's shape without some of its size-1 dims)."""
    if not eqn.invars or C.is_literal(eqn.invars[0]) or len(eqn.outvars) != 1:
        return None
    shape, out = tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "squeeze":
        return tuple(sorted(d % len(shape) for d in eqn.params["dimensions"]))
    if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is None and len(out) < len(shape):
        return _unit_dims_to_drop(shape, out)
    return None


def _unit_dims_to_drop(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...] | None:
    """The size-1 dims of `shape` whose removal leaves `out`, or None if no such dims exist."""
    kept, j = [], 0
    for d, n in enumerate(shape):
        if j < len(out) and out[j] == n:
            kept.append(d)
            j += 1
        elif n != 1:
            return None
    return tuple(d for d in range(len(shape)) if d not in kept) if j == len(out) else None


class _UnitDims:
    """Binds the equations of a retrace, reading a removal of unit dims (`squeeze`, or a reshape
    that only drops size-1 dims) from an elementwise op's result as the elementwise op of its
    operands without those dims, down to broadcasts (and unit-dim reshapes) that added them.

    `squeeze(mul(silu(x[None]), y[None]), 0)` is bound as `mul(silu(x), y)`, and
    `squeeze(x[None], 0)` as `x`: elementwise ops commute with adding and removing unit dims, so
    the values are the same bit for bit. Only a removal whose operand tree ends in such broadcasts
    everywhere is rewritten (no new squeeze of another value is made); anything else, or any error,
    binds the equation as written.
    """

    def __init__(self) -> None:
        self._made: dict[int, tuple[Any, C.JaxprEqn, list[Any]]] = {}  # id(value) -> its equation
        self._done: dict[tuple[int, tuple[int, ...]], tuple[Any, Any]] = {}  # (id, dims) -> (value, result)

    def bind(self, eqn: C.JaxprEqn, invals: list[Any]) -> list[Any]:
        """`eqn` bound on `invals`, with a removal of unit dims read through (see the class)."""
        dims = _removed_unit_dims(eqn)
        got = None if dims is None else self._without_unit_dims(eqn, invals[0], dims)
        if got is not None:
            return [got]
        outs = C.bind_eqn(eqn, invals)
        if _recorded(eqn):
            self._made[id(outs[0])] = (outs[0], eqn, invals)
        return outs

    def _without_unit_dims(self, eqn: C.JaxprEqn, val: Any, dims: tuple[int, ...]) -> Any | None:
        """`val` without the unit dims `dims`, computed from recorded values, if it has `eqn`'s type."""
        try:
            got = self._drop(val, dims)
        except Exception:  # noqa: BLE001 - the normal form is optional: bind as written instead
            if strict():
                raise
            log.debug("moefuse: could not remove unit dims through %s", eqn.primitive, exc_info=True)
            return None
        want = eqn.outvars[0].aval
        if got is None or tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            return None
        return got

    def _drop(self, val: Any, dims: tuple[int, ...]) -> Any | None:
        """`val` with its size-1 dims `dims` removed, or None when not every leaf is a broadcast."""
        if not dims:
            return val
        made = self._made.get(id(val))
        if made is None or made[0] is not val:
            return None
        done = self._done.get((id(val), dims))
        if done is not None and done[0] is val:
            return done[1]
        _, eqn, invals = made
        out = [n for d, n in enumerate(val.shape) if d not in dims]
        got = self._drop_through(eqn, invals, dims, tuple(out))
        self._done[(id(val), dims)] = (val, got)
        return got

    def _drop_through(self, eqn: C.JaxprEqn, invals: list[Any], dims: tuple[int, ...], out: tuple) -> Any:
        """The result of recorded `eqn` without its unit dims `dims` (shape `out`), or None."""
        src = invals[0]
        if eqn.primitive.name == "broadcast_in_dim":
            bcast = tuple(eqn.params["broadcast_dimensions"])
            kept = [i for i, d in enumerate(bcast) if d not in dims]  # operand dims that stay
            inner = self._drop(src, tuple(i for i, d in enumerate(bcast) if d in dims))
            if inner is None:
                return None
            new_bcast = tuple(bcast[i] - sum(r < bcast[i] for r in dims) for i in kept)
            if jnp.shape(inner) == out and new_bcast == tuple(range(len(out))):
                return inner
            return jax.lax.broadcast_in_dim(inner, out, new_bcast)
        if eqn.primitive.name == "reshape":
            if _unit_dims_to_drop(tuple(eqn.outvars[0].aval.shape), jnp.shape(src)) is None:
                return None  # only a reshape that added unit dims is read through
            return src if jnp.shape(src) == out else jax.lax.reshape(src, out)
        rank = len(eqn.outvars[0].aval.shape)
        args = [a if jnp.ndim(a) == 0 else self._drop(a, dims) for a in invals]
        if any(a is None for a in args) or any(jnp.ndim(a) not in (0, rank) for a in invals):
            return None
        return C.bind_eqn(eqn, args)[0]


def evaluate(level: Level, args: Sequence[Any]) -> list[Any]:
    """Evaluate `level` on `args` (arrays or tracers), emitting fused ops for its matches."""
    jaxpr = level.closed.jaxpr
    env: dict[Any, Any] = {}
    _write(env, jaxpr.constvars, level.closed.consts)
    _write(env, jaxpr.invars, args)
    order = level.order if level.order is not None else [("e", i) for i in range(len(jaxpr.eqns))]
    for kind, n in order:
        if kind == "m":
            _emit_or_run_original(level.matches[n], jaxpr, env)
            continue
        eqn = jaxpr.eqns[n]
        invals = [_read(env, v) for v in eqn.invars]
        bodies = {k: sub for k, sub in level.subs.get(n, {}).items() if sub.changed}
        params = _rebuilt_params(eqn, bodies) if bodies else None
        _write(env, eqn.outvars, C.bind_eqn(eqn, invals, params))
    return [_read(env, v) for v in jaxpr.outvars]


def _emit_or_run_original(m: Match, jaxpr: C.Jaxpr, env: dict[Any, Any]) -> None:
    """Emit the fused op of `m`; if that fails, bind the region's original equations instead."""
    try:
        outs = m.proposal.emit(m.kernel, *[_read(env, v) for v in m.proposal.inputs])
        _write(env, m.proposal.outputs, outs)
        return
    except Exception:
        if strict():
            raise
        log.warning(
            "moefuse: emitting %s at %s failed; running it as written",
            m.site.op,
            m.site.location,
            exc_info=True,
        )
    for i in sorted(m.region):
        eqn = jaxpr.eqns[i]
        _write(env, eqn.outvars, C.bind_eqn(eqn, [_read(env, v) for v in eqn.invars]))


def _rebuilt_params(eqn: C.JaxprEqn, bodies: dict) -> dict[str, Any] | None:
    """`eqn`'s params with its changed bodies rebuilt, or None (the original) if rebuilding fails."""
    try:
        return C.with_sub_jaxprs(eqn, {k: _rebuild(sub, eqn) for k, sub in bodies.items()})
    except Exception:
        if strict():
            raise
        log.warning(
            "moefuse: rebuilding the body of `%s` failed; it runs as written",
            eqn.primitive.name,
            exc_info=True,
        )
        return None


def _rebuild(sub: Level, eqn: C.JaxprEqn) -> C.ClosedJaxpr:
    """A new body for `eqn`: `sub` evaluated with its rewrites, traced to a closed jaxpr."""
    with C.body_trace_context(eqn):
        return C.trace_to_closed_jaxpr(lambda *a: evaluate(sub, a), [v.aval for v in sub.closed.jaxpr.invars])


def _read(env: dict[Any, Any], atom: Any) -> Any:
    return atom.val if C.is_literal(atom) else env[atom]


def _write(env: dict[Any, Any], vars_: Sequence[Any], vals: Sequence[Any]) -> None:
    for v, x in zip(vars_, vals, strict=True):
        if not C.is_dropvar(v):
            env[v] = x
