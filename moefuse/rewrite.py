"""The rewriting interpreter: analyse a jaxpr (recursively), then re-evaluate it with fused ops.

`analyse` walks a ClosedJaxpr and every body of its higher-order equations (`jit`, `scan`,
`while`, `cond`, `remat`, `shard_map`, `custom_jvp_call`, `custom_vjp_call`), asks the
patterns for matches, checks them, and returns a `Level` tree. `evaluate` re-binds the
equations of a Level on concrete values or tracers, emitting the fused op for each match and
rebuilding bodies that contain matches::

    level = analyse(closed_jaxpr, platform="cpu")
    outs = evaluate(level, flat_args)      # inside jax.jit: the rewritten program
    level.sites(), level.declines()        # what the Plan shows
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import networkx as nx

from moefuse import _compat as C
from moefuse import _testing
from moefuse.match import NoMatch, Proposal, escaping, region_of, region_problem
from moefuse.plan import Decline, Site
from moefuse.select import select
from moefuse.view import View

log = logging.getLogger("moefuse")


@dataclasses.dataclass
class Match:
    proposal: Proposal
    region: set[int]
    kernel: str
    site: Site


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


def analyse(closed: C.ClosedJaxpr, platform: str, path: str = "") -> Level:
    """Find and check every match in `closed` and its bodies."""
    from moefuse.patterns import PATTERNS

    flat = inline_jits(closed) if _has_jit(closed.jaxpr) else closed
    view = View(flat)
    matches: list[Match] = []
    declined: list[Decline] = []
    claimed: set[int] = set()
    for pattern in PATTERNS:
        try:
            anchors = sorted(pattern.anchors(view), reverse=True)
        except Exception:  # noqa: BLE001 - a pattern bug must never break the user's program
            log.warning(
                "moefuse: the %s pattern failed to scan a jaxpr; nothing fused by it there",
                pattern.op,
                exc_info=True,
            )
            continue
        for anchor in anchors:
            if anchor in claimed:
                continue
            got = _try(view, pattern, anchor, platform, path, claimed)
            if isinstance(got, Match):
                matches.append(got)
                claimed |= got.region
            else:
                declined.append(got)
                log.debug("declined %s at %s: %s", got.op, got.location, got.reason)
    matches.sort(key=lambda m: m.proposal.anchor)  # the Plan lists sites in program order
    order = _schedule(view, matches) if matches else None
    base = flat if matches else closed
    subs = _analyse_bodies(base, platform, path, claimed if matches else set())
    changed = bool(matches) or any(sub.changed for b in subs.values() for sub in b.values())
    if not changed and not _testing.retracing_all():
        return Level(closed, [], subs, declined, False)
    return Level(base, matches, subs, declined, True, order)


def _try(
    view: View, pattern: Any, anchor: int, platform: str, path: str, claimed: set[int]
) -> Match | Decline:
    eqn = view.jaxpr.eqns[anchor]
    try:
        got = pattern.match(view, anchor)
    except Exception as e:  # noqa: BLE001 - a pattern bug must never break the user's program
        log.debug("pattern %s failed at equation %d", pattern.op, anchor, exc_info=True)
        return _decline(
            pattern.op,
            eqn,
            f"internal error in the {pattern.op} pattern, left unfused ({type(e).__name__}: {e})",
            path,
        )
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
    reason = region_problem(view, region, prop)
    if reason is None and region & claimed:
        reason = "overlaps a region already fused"
    if reason is None:
        reason = _type_problem(prop)
    if reason is None and not _convex(view, region):
        reason = "the region's outputs feed back into its own inputs through the rest of the program"
    kernel, note = select(prop.op, platform)
    if reason is None and kernel is None:
        reason = note
    if reason is not None:
        return _decline(prop.op, eqn, reason, path)
    file, line, _ = C.eqn_location(eqn)
    site = Site(
        op=prop.op,
        location=f"{C.relpath(file)}:{line}",
        kernel=kernel,
        params=prop.params,
        scope=C.eqn_scope(eqn),
        source=_source_line(file, line),
        path=path,
    )
    log.debug("fused %s at %s with %s", prop.op, site.location, kernel)
    return Match(prop, region, kernel, site)


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


def _type_problem(prop: Proposal) -> str | None:
    """The fused op must produce exactly the original outputs' shapes and dtypes."""
    try:
        outs = jax.eval_shape(lambda *a: list(prop.emit("reference", *a)), *[_sds(v) for v in prop.inputs])
    except Exception as e:  # noqa: BLE001 - any failure means we cannot prove equality
        return f"fused op cannot be built for these inputs: {type(e).__name__}: {e}"
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


def _schedule(view: View, matches: list[Match]) -> list[Any]:
    """Topological order of units (equation indices and matches), original order preferred.

    Each match is one unit ("m", n); every other equation is ("e", index). Matches are convex
    (checked in `_try`), so the graph has no cycle.
    """
    owner = {i: m_i for m_i, m in enumerate(matches) for i in m.region}
    graph = nx.DiGraph()
    unit_of: dict[Any, Any] = {}
    keys: dict[Any, int] = {}
    for i, eqn in enumerate(view.jaxpr.eqns):
        unit = ("m", owner[i]) if i in owner else ("e", i)
        graph.add_node(unit)
        keys.setdefault(unit, i)
        for v in eqn.outvars:
            unit_of[v] = unit
    for i, eqn in enumerate(view.jaxpr.eqns):
        unit = ("m", owner[i]) if i in owner else ("e", i)
        for v in eqn.invars:
            src = None if C.is_literal(v) else unit_of.get(v)
            if src is not None and src != unit:
                graph.add_edge(src, unit)
    for m_i, m in enumerate(matches):
        for v in m.proposal.inputs:
            src = None if C.is_literal(v) else unit_of.get(v)
            if src is not None and src != ("m", m_i):
                graph.add_edge(src, ("m", m_i))
    return list(nx.lexicographical_topological_sort(graph, key=lambda u: keys[u]))


def _analyse_bodies(closed: C.ClosedJaxpr, platform: str, path: str, skip: set[int]) -> dict:
    subs: dict[int, dict[tuple[str, int | None], Level]] = {}
    for i, eqn in enumerate(closed.jaxpr.eqns):
        if i in skip:
            continue
        for key, idx, body in C.sub_jaxprs(eqn):
            name = eqn.primitive.name + ("" if key in ("jaxpr", "call_jaxpr") else f".{key}")
            name += "" if idx is None else f"[{idx}]"
            subs.setdefault(i, {})[(key, idx)] = analyse(
                C.as_closed(body), platform, f"{path}/{name}" if path else name
            )
    return subs


def _has_jit(jaxpr: C.Jaxpr) -> bool:
    return any(e.primitive.name in C.JIT_NAMES for e in jaxpr.eqns)


def inline_jits(closed: C.ClosedJaxpr) -> C.ClosedJaxpr:
    """`closed` with every nested `jit` equation inlined (bodies of other primitives untouched)."""

    def run(*args: Any) -> list[Any]:
        return _eval_inlining(closed.jaxpr, closed.consts, args)

    return C.trace_to_closed_jaxpr(run, [v.aval for v in closed.jaxpr.invars])


def _eval_inlining(jaxpr: C.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}
    _write(env, jaxpr.constvars, consts)
    _write(env, jaxpr.invars, args)
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if eqn.primitive.name in C.JIT_NAMES:
            body = C.as_closed(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
            outs = _eval_inlining(body.jaxpr, body.consts, invals)
        else:
            outs = C.bind_eqn(eqn, invals)
        _write(env, eqn.outvars, outs)
    return [_read(env, v) for v in jaxpr.outvars]


def evaluate(level: Level, args: Sequence[Any]) -> list[Any]:
    """Evaluate `level` on `args` (arrays or tracers), emitting fused ops for its matches."""
    jaxpr = level.closed.jaxpr
    env: dict[Any, Any] = {}
    _write(env, jaxpr.constvars, level.closed.consts)
    _write(env, jaxpr.invars, args)
    order = level.order if level.order is not None else [("e", i) for i in range(len(jaxpr.eqns))]
    for kind, n in order:
        if kind == "m":
            m = level.matches[n]
            outs = m.proposal.emit(m.kernel, *[_read(env, v) for v in m.proposal.inputs])
            _write(env, m.proposal.outputs, outs)
            continue
        eqn = jaxpr.eqns[n]
        invals = [_read(env, v) for v in eqn.invars]
        bodies = {k: sub for k, sub in level.subs.get(n, {}).items() if sub.changed}
        if bodies:
            params = C.with_sub_jaxprs(eqn, {k: _rebuild(sub, eqn) for k, sub in bodies.items()})
            outs = C.bind_eqn(eqn, invals, params)
        else:
            outs = C.bind_eqn(eqn, invals)
        _write(env, eqn.outvars, outs)
    return [_read(env, v) for v in jaxpr.outvars]


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
