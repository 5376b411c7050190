"""Public entry points: `jit`, `fuse`, `plan`, `rewritten_jaxpr`.

    @moefuse.jit                          # drop-in for jax.jit
    def model(params, x): ...

    fast = moefuse.fuse(model)            # pure transform: compose with jax.jit / grad / vmap
    print(moefuse.plan(model, params, x)) # what would be fused, and what was declined and why

`MOEFUSE_DISABLE=1` turns the pass off; `MOEFUSE_LOG=debug` logs every matching decision.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from moefuse import _compat as C
from moefuse.plan import Plan
from moefuse.rewrite import Level, analyse, evaluate
from moefuse.verify import check_outputs

log = logging.getLogger("moefuse")
if os.environ.get("MOEFUSE_LOG"):
    logging.basicConfig()
    log.setLevel(os.environ["MOEFUSE_LOG"].upper())


def disabled() -> bool:
    return os.environ.get("MOEFUSE_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


@dataclasses.dataclass
class _Traced:
    closed: C.ClosedJaxpr
    dynamic: list[Any]  # the leaves that are traced inputs, in order
    out_tree: Any


def _is_dynamic(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or isinstance(
        leaf, jax.core.Tracer
    )


def _trace(fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> _Traced:
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    dyn_pos = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]
    out_tree: list[Any] = []

    def flat_fun(*dyn: Any) -> list[Any]:
        full = list(leaves)
        for i, x in zip(dyn_pos, dyn):
            full[i] = x
        a, kw = jax.tree_util.tree_unflatten(tree, full)
        out_leaves, otree = jax.tree_util.tree_flatten(fun(*a, **kw))
        out_tree.append(otree)
        return out_leaves

    closed = C.trace_to_closed_jaxpr(flat_fun, [C.aval_of(leaves[i]) for i in dyn_pos])
    return _Traced(closed, [leaves[i] for i in dyn_pos], out_tree[0])


def _platform(values: list[Any]) -> str:
    for x in values:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            try:
                return next(iter(x.devices())).platform
            except Exception:  # noqa: BLE001 - abstract or deleted arrays: fall back
                break
    return jax.default_backend()


def _analysed(fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[_Traced, Level, str]:
    traced = _trace(fun, args, kwargs)
    platform = _platform(traced.dynamic)
    return traced, analyse(traced.closed, platform), platform


def fuse(fun: Callable[..., Any]) -> Callable[..., Any]:
    """The moefuse transform of `fun`: same results, MoE regions replaced by fused ops."""

    @functools.wraps(fun)
    def fused(*args: Any, **kwargs: Any) -> Any:
        if disabled():
            return fun(*args, **kwargs)
        traced, level, _ = _analysed(fun, args, kwargs)
        outs = evaluate(level, traced.dynamic)
        return jax.tree_util.tree_unflatten(traced.out_tree, outs)

    return fused


def jit(fun: Callable[..., Any] | None = None, *, verify: bool = False, **jit_kwargs: Any) -> Any:
    """Drop-in for `jax.jit` that applies the moefuse pass (cached per signature, like jax.jit).

    With `verify=True`, the first call of each signature also runs the original program and
    raises `moefuse.VerificationError` when expert ids differ or values exceed tolerance.
    """
    if fun is None:
        return functools.partial(jit, verify=verify, **jit_kwargs)
    original = jax.jit(fun, **jit_kwargs)
    jitted = jax.jit(fuse(fun), **jit_kwargs)
    if not verify:
        return jitted
    seen: set[Any] = set()
    donated = bool(jit_kwargs.get("donate_argnums") or jit_kwargs.get("donate_argnames"))

    @functools.wraps(fun)
    def checked(*args: Any, **kwargs: Any) -> Any:
        key = _signature(args, kwargs)
        if key in seen or disabled():
            return jitted(*args, **kwargs)
        ref_args, ref_kwargs = jax.tree_util.tree_map(_copy, (args, kwargs)) if donated else (args, kwargs)
        expected = original(*ref_args, **ref_kwargs)
        got = jitted(*args, **kwargs)
        check_outputs(expected, got)
        seen.add(key)
        return got

    checked.lower = jitted.lower  # type: ignore[attr-defined]
    return checked


def _copy(x: Any) -> Any:
    return x.copy() if isinstance(x, jax.Array) else x


def _signature(args: tuple, kwargs: dict[str, Any]) -> Any:
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    sig = tuple(
        (tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype") else ("static", repr(x))
        for x in leaves
    )
    return tree, sig


def plan(fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Plan:
    """Analyse `fun` at these arguments (arrays or jax.ShapeDtypeStruct) without running it."""
    _, level, platform = _analysed(fun, args, kwargs)
    return Plan(fused=level.sites(), declined=level.declines(), platform=platform)


def rewritten_jaxpr(fun: Callable[..., Any], *args: Any, **kwargs: Any) -> C.ClosedJaxpr:
    """The jaxpr of the rewritten program at these arguments (arrays or ShapeDtypeStructs)."""
    traced, level, _ = _analysed(fun, args, kwargs)
    return C.trace_to_closed_jaxpr(lambda *a: evaluate(level, a), [C.aval_of(x) for x in traced.dynamic])
