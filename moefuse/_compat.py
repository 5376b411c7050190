"""The one module that touches JAX internals.

Everything else in moefuse works with what this module exposes: jaxpr types, primitive-name
sets, binding an equation again, tracing a Python function to a closed jaxpr, the sub-jaxprs
of higher-order primitives, and source locations. JAX renames (pjit -> jit, remat2 ->
checkpoint, ClosedJaxpr changes) are absorbed here::

    closed = trace_to_closed_jaxpr(fn, [aval_of(x) for x in leaves])
    for eqn in closed.jaxpr.eqns:
        outs = bind_eqn(eqn, [env[v] for v in eqn.invars])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend.core as jex
from jax._src import core as _core
from jax._src import source_info_util as _siu
from jax._src.interpreters import partial_eval as _pe

ClosedJaxpr = jex.ClosedJaxpr
Jaxpr = jex.Jaxpr
JaxprEqn = jex.JaxprEqn
Literal = jex.Literal
Var = jex.Var
DropVar = jex.DropVar

# Primitive names, as different JAX versions spell them.
JIT_NAMES = frozenset({"pjit", "jit", "closed_call", "core_call"})
CUSTOM_VJP_NAMES = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
CUSTOM_JVP_NAMES = frozenset({"custom_jvp_call", "custom_jvp_call_jaxpr"})
SHARD_MAP_NAMES = frozenset({"shard_map"})
# Primitives whose body runs once with its inputs bound to the equation's operands, in order.
REMAT_NAMES = frozenset({"checkpoint", "remat", "remat2"})
BOUND_ONCE_NAMES = JIT_NAMES | CUSTOM_VJP_NAMES | CUSTOM_JVP_NAMES | SHARD_MAP_NAMES | REMAT_NAMES
# Params that are not program bodies to rewrite: custom differentiation rules (only the primal
# body is rewritten) and scatter's element combiner.
_RULE_PARAMS = frozenset({"jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd", "update_jaxpr"})


def is_literal(atom: Any) -> bool:
    return isinstance(atom, Literal)


def is_dropvar(atom: Any) -> bool:
    return isinstance(atom, DropVar)


def aval_of(x: Any) -> Any:
    """Abstract value of an array, tracer or ShapeDtypeStruct (weak types kept)."""
    return jax.typeof(x)


def trace_to_closed_jaxpr(fn: Callable[..., Sequence[Any]], in_avals: Sequence[Any]) -> ClosedJaxpr:
    """Trace `fn` (flat arrays in, flat list out) at abstract values into a ClosedJaxpr."""
    from jax._src import api_util
    from jax._src import linear_util as lu

    dbg = api_util.debug_info("moefuse", fn, tuple(in_avals), {})
    wrapped = lu.wrap_init(lambda *a: list(fn(*a)), debug_info=dbg)
    jaxpr, _, consts = _pe.trace_to_jaxpr_dynamic(wrapped, list(in_avals))[:3]
    return ClosedJaxpr(jaxpr, consts)


def open_jaxpr_without_consts(closed: ClosedJaxpr) -> Jaxpr:
    """The open Jaxpr of `closed`, for params that hold an open jaxpr (remat, shard_map)."""
    if closed.consts:
        raise RewriteUnsupported(
            f"rewritten body captured {len(closed.consts)} constant(s); this primitive holds an open jaxpr"
        )
    return closed.jaxpr


class RewriteUnsupported(Exception):
    """Raised when a rebuilt body cannot be put back into its primitive (an open-jaxpr body that
    captured array constants). Fused ops are built without array constants (tested), so this
    signals a kernel bug; it is not turned into a decline."""


def bind_eqn(eqn: JaxprEqn, invals: Sequence[Any], params: dict[str, Any] | None = None) -> list[Any]:
    """Bind `eqn`'s primitive again on `invals` (optionally with replaced params)."""
    params = eqn.params if params is None else params
    got = eqn.primitive.get_bind_params(params)
    subfuns, bind_params = got if isinstance(got, tuple) else ((), got)  # older JAX: (subfuns, params)
    name_stack = _siu.current_name_stack() + eqn.source_info.name_stack
    with _siu.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def sub_jaxprs(eqn: JaxprEqn) -> Iterator[tuple[str, int | None, ClosedJaxpr | Jaxpr]]:
    """(param name, index in a tuple param or None, jaxpr) for each body of `eqn` to rewrite.

    Custom differentiation rules are skipped: only primal bodies are rewritten, the rule of the
    original stays valid because a fused op computes the same function.
    """
    for key, val in eqn.params.items():
        if key in _RULE_PARAMS:
            continue
        if isinstance(val, (ClosedJaxpr, Jaxpr)):
            yield key, None, val
        elif isinstance(val, tuple) and val and all(isinstance(v, (ClosedJaxpr, Jaxpr)) for v in val):
            for i, v in enumerate(val):
                yield key, i, v


def with_sub_jaxprs(eqn: JaxprEqn, replaced: dict[tuple[str, int | None], ClosedJaxpr]) -> dict[str, Any]:
    """Params of `eqn` with some bodies replaced by new closed jaxprs (same type as before)."""
    params = dict(eqn.params)
    for (key, idx), new in replaced.items():
        old = eqn.params[key] if idx is None else eqn.params[key][idx]
        val = new if isinstance(old, ClosedJaxpr) else open_jaxpr_without_consts(new)
        if idx is None:
            params[key] = val
        else:
            items = list(params[key])
            items[idx] = val
            params[key] = tuple(items)
    return params


def inline_custom_vjps(
    closed: ClosedJaxpr, inline_body: Callable[[ClosedJaxpr], ClosedJaxpr]
) -> tuple[ClosedJaxpr, list[int]]:
    """`closed` with each `custom_vjp_call` replaced by its primal body, for matching only, and for
    each equation of the result the index of the equation of `closed` it comes from.

    `inline_body` flattens a body (nested `jit`s) and gives it fresh vars. A body with constants,
    or whose outputs are not each made by one of its own equations, is kept as the call. The
    result's top-level vars are `closed`'s, so a match found in it names `closed`'s values.
    """
    eqns: list[JaxprEqn] = []
    origin: list[int] = []
    for i, eqn in enumerate(closed.jaxpr.eqns):
        inner = _inlined_body(eqn, inline_body) if eqn.primitive.name in CUSTOM_VJP_NAMES else None
        for e in inner if inner is not None else [eqn]:
            eqns.append(e)
            origin.append(i)
    if len(eqns) == len(closed.jaxpr.eqns):
        return closed, origin
    j = closed.jaxpr
    jaxpr = Jaxpr(j.constvars, j.invars, j.outvars, eqns, j.effects, j.debug_info)
    return ClosedJaxpr(jaxpr, closed.consts), origin


def _inlined_body(eqn: JaxprEqn, inline_body: Callable[[ClosedJaxpr], ClosedJaxpr]) -> list[JaxprEqn] | None:
    try:
        body = inline_body(as_closed(eqn.params["call_jaxpr"]))
    except Exception:  # noqa: BLE001 - a body we cannot flatten is matched as the call itself
        return None
    outs = body.jaxpr.outvars
    made = {v for e in body.jaxpr.eqns for v in e.outvars}
    if body.consts or len(set(map(id, outs))) != len(outs) or not all(v in made for v in outs):
        return None
    rename: dict[Any, Any] = dict(zip(body.jaxpr.invars, eqn.invars))
    rename.update((o, c) for o, c in zip(outs, eqn.outvars) if not is_dropvar(c))
    swap = lambda vs: [v if is_literal(v) else rename.get(v, v) for v in vs]
    return [e.replace(invars=swap(e.invars), outvars=swap(e.outvars)) for e in body.jaxpr.eqns]


def custom_rule_name(eqn: JaxprEqn) -> str:
    """A readable name of a custom_vjp call's rule (its function name where JAX keeps it)."""
    name = eqn.params.get("name")
    if name:
        return str(name)
    bwd = eqn.params.get("bwd")
    return str(getattr(bwd, "__name__", None) or getattr(getattr(bwd, "f", None), "__name__", "custom_vjp"))


def as_closed(j: ClosedJaxpr | Jaxpr) -> ClosedJaxpr:
    return j if isinstance(j, ClosedJaxpr) else ClosedJaxpr(j, ())


@contextlib.contextmanager
def body_trace_context(eqn: JaxprEqn) -> Iterator[None]:
    """Context needed to trace a replacement body of `eqn` (axis names for shard_map)."""
    if eqn.primitive.name not in SHARD_MAP_NAMES:
        yield
        return
    from jax._src import config as _config
    from jax._src import shard_map as _sm

    mesh = eqn.params["mesh"]
    manual = eqn.params.get("newly_manual_axes", frozenset(mesh.axis_names))
    check = eqn.params.get("check_vma", eqn.params.get("check_rep", True))
    with contextlib.ExitStack() as stack:
        if hasattr(_sm, "_extend_axis_env"):
            stack.enter_context(_sm._extend_axis_env(mesh, manual))
        else:
            stack.enter_context(_core.extend_axis_env_nd(tuple(mesh.shape.items())))
        if hasattr(_sm, "_as_manual_mesh") and hasattr(_sm, "use_abstract_mesh"):
            stack.enter_context(_sm.use_abstract_mesh(_sm._as_manual_mesh(mesh, manual)))
        if hasattr(_config, "_check_vma"):
            stack.enter_context(_config._check_vma(check))
        yield


def eqn_location(eqn: JaxprEqn) -> tuple[str, int, str]:
    """(file, line, function) of the user frame that created `eqn` ("?", 0, "") if unknown."""
    frame = _siu.user_frame(eqn.source_info.traceback)
    if frame is None:
        return "?", 0, ""
    return frame.file_name, frame.start_line, frame.function_name


def eqn_scope(eqn: JaxprEqn) -> str:
    """The name stack of `eqn` (Flax module path, named scopes), "" when empty."""
    return str(eqn.source_info.name_stack)


def relpath(path: str) -> str:
    """`path` as the Plan shows it: inside an installed library, relative to the folder it is
    installed in (`/venv/lib/python3.11/site-packages/maxtext/layers/moe.py` -> `maxtext/layers/moe.py`);
    otherwise relative to the current folder when it is under it, else unchanged."""
    parts = os.path.normpath(path).split(os.sep)
    installed = [i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")]
    if installed and installed[-1] + 1 < len(parts):
        return os.path.join(*parts[installed[-1] + 1 :])
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def mesh_device() -> tuple[str, str] | None:
    """(platform, device_kind) of the abstract device of the current mesh (`jax.set_mesh`,
    `use_abstract_mesh`), or None when no mesh with a device is set."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    device = getattr(get(), "abstract_device", None) if get is not None else None
    if device is None:
        return None
    return str(device.platform), str(device.device_kind)
