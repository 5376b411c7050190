"""Public entry points: `jit`, `fuse`, `plan`, `rewritten_jaxpr`.

    @moefuse.jit                          # drop-in for jax.jit
    def model(params, x): ...

    tpu = moefuse.jit(model, platform="tpu")            # plan for TPU from any host (export / AOT)
    tpu.plan(params, x)                                  # the Plan under those options
    moefuse.jit(model, platform="tpu", interpret=True)  # run the TPU kernels in interpret mode
    moefuse.jit(model, kernels={"moe": "xla"})          # force an implementation

    fast = moefuse.fuse(model)            # pure transform: compose with jax.jit / grad / vmap
    print(moefuse.plan(model, params, x)) # what would be fused, and what was declined and why

`MOEFUSE_DISABLE=1` turns the pass off; `MOEFUSE_LOG=debug` logs every matching decision
(`MOEFUSE_LOG=1`, `true`, `yes`, `on` or `info`: only what was fused and declined).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import logging
import os
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from moefuse import _compat as C
from moefuse import select
from moefuse.plan import Plan
from moefuse.rewrite import Level, analyse, evaluate
from moefuse.verify import check_outputs

log = logging.getLogger("moefuse")

_LOG_OFF = ("", "0", "false", "no", "off")
_LOG_ON = ("1", "true", "yes", "on")
_LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


def log_level(value: str) -> int | None:
    """The logging level a `MOEFUSE_LOG` value asks for (None: logging off).

    `1`/`true`/`yes`/`on` mean INFO; level names (`debug`, `info`, `warning`, `error`, `critical`)
    any case. Raises ValueError, saying what is valid, for anything else.
    """
    v = value.strip().lower()
    if v in _LOG_OFF:
        return None
    if v in _LOG_ON:
        return logging.INFO
    if v in _LOG_LEVELS:
        return getattr(logging, v.upper())
    raise ValueError(
        f"MOEFUSE_LOG={value!r} is not understood, so moefuse logging stays off; use one of "
        f"{', '.join(_LOG_ON)} (= info), {', '.join(n for n in _LOG_LEVELS if n != 'warn')}, "
        f"or {', '.join(repr(v) for v in _LOG_OFF)} (off)"
    )


def _configure_logging() -> None:
    try:
        level = log_level(os.environ.get("MOEFUSE_LOG", ""))
    except ValueError as e:  # never fail `import moefuse` over a logging setting
        warnings.warn(str(e), RuntimeWarning, stacklevel=2)
        return
    if level is not None:
        logging.basicConfig()
        log.setLevel(level)


_configure_logging()


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
        out = fun(*a, **kw)
        _check_jax_types(fun, out)
        out_leaves, otree = jax.tree_util.tree_flatten(out)
        out_tree.append(otree)
        return out_leaves

    closed = C.trace_to_closed_jaxpr(flat_fun, [C.aval_of(leaves[i]) for i in dyn_pos])
    return _Traced(closed, [leaves[i] for i in dyn_pos], out_tree[0])


def _check_jax_types(fun: Callable[..., Any], out: Any) -> None:
    """Raise jax.jit's TypeError when `fun` returned something that is not a JAX value (a str, ...)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        try:
            jax.typeof(leaf)
        except TypeError:
            where = f" at output component {jax.tree_util.keystr(path)}" if path else ""
            raise TypeError(
                f"function {_describe(fun)} traced for moefuse returned a value of type {type(leaf)}"
                f"{where}, which is not a valid JAX type"
            ) from None


def _describe(fun: Callable[..., Any]) -> str:
    """`name at file:line`, as JAX names a traced function."""
    name = getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None) or type(fun).__name__
    code = getattr(inspect.unwrap(fun), "__code__", None)
    return f"{name} at {code.co_filename}:{code.co_firstlineno}" if code is not None else name


@dataclasses.dataclass(frozen=True)
class Options:
    """How kernels are chosen: see `jit`."""

    platform: str | None = (
        None  # None: the arguments' devices, else the mesh's device, else the default backend
    )
    interpret: bool = False
    kernels: tuple[tuple[str, str], ...] = ()


def _device(values: list[Any]) -> Any:
    for x in values:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            try:
                return next(iter(x.devices()))
            except Exception:  # noqa: BLE001 - abstract or deleted arrays: fall back
                break
    return None


def _target(options: Options, values: list[Any]) -> select.Target:
    """Platform and chip the kernels are chosen for (see `Options.platform`)."""
    device, mesh = _device(values), C.mesh_device()
    if options.platform is not None:
        platform = select.normalise_platform(options.platform)
    elif device is not None:
        platform = select.normalise_platform(device.platform)
    elif mesh is not None:
        platform = select.normalise_platform(mesh[0])
    else:
        platform = select.normalise_platform(jax.default_backend())
    kind, capability = "", ""
    if mesh is not None and select.normalise_platform(mesh[0]) == platform:
        kind = mesh[1]
    else:
        if device is None or select.normalise_platform(device.platform) != platform:
            device = _local_device(platform)
        if device is not None:
            kind, capability = device.device_kind, str(getattr(device, "compute_capability", "") or "")
    return select.target_for(
        platform,
        device_kind=kind,
        compute_capability=capability,
        interpret=options.interpret,
        kernels=dict(options.kernels),
    )


def _local_device(platform: str) -> Any:
    try:
        return jax.devices(platform)[0]
    except RuntimeError:  # no such backend on this host: plan without a chip
        return None


def _analysed(
    fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any], options: Options
) -> tuple[_Traced, Level, select.Target]:
    with _no_gc():
        traced = _trace(fun, args, kwargs)
        target = _target(options, traced.dynamic)
        return traced, analyse(traced.closed, target), target


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused while a program is analysed: the analysis makes many small
    objects that live until it ends (views, proposals), and collecting them cost a fifth of plan time
    on a 64-layer model (benchmarks/plan_cost.py). Reference counting still frees what is dropped."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def fuse(fun: Callable[..., Any], *, options: Options = Options()) -> Callable[..., Any]:
    """The moefuse transform of `fun`: same results, MoE regions replaced by fused ops."""

    @functools.wraps(fun)
    def fused(*args: Any, **kwargs: Any) -> Any:
        if disabled():
            return fun(*args, **kwargs)
        traced, level, _ = _analysed(fun, args, kwargs, options)
        outs = evaluate(level, traced.dynamic)
        return jax.tree_util.tree_unflatten(traced.out_tree, outs)

    return fused


def jit(
    fun: Callable[..., Any] | None = None,
    *,
    verify: bool = False,
    platform: str | None = None,
    interpret: bool = False,
    kernels: dict[str, str] | None = None,
    **jit_kwargs: Any,
) -> Any:
    """Drop-in for `jax.jit` that applies the moefuse pass (cached per signature, like jax.jit).

    `platform` ("tpu", "gpu", "cpu") chooses kernels for that platform instead of the default
    backend, so a CPU host can lower, `jax.export` or AOT-compile for an accelerator; under a mesh
    (`jax.set_mesh`, `use_abstract_mesh`) the chip comes from the mesh's device kind.
    `interpret=True` runs the chosen Pallas kernels in interpret mode (numerics on any host).
    `kernels={"moe": "xla"}` forces an implementation per op (unknown names raise ValueError with
    the valid ones). The result's `.plan(*args, **kwargs)` is the Plan under these options.
    With `verify=True`, the first call of each signature also runs the original program and
    raises `moefuse.VerificationError` when expert ids differ or values exceed tolerance.
    """
    options = Options(platform, interpret, select.check_forced(kernels))
    if platform is not None:
        select.target_for(platform)  # a bad platform name fails here, not at the first call
    if fun is None:
        return functools.partial(
            jit, verify=verify, platform=platform, interpret=interpret, kernels=kernels, **jit_kwargs
        )
    original = jax.jit(fun, **jit_kwargs)
    jitted = jax.jit(fuse(fun, options=options), **jit_kwargs)
    plan_under_options = functools.partial(_plan, fun, options)
    if not verify:
        return _with_plan(jitted, plan_under_options)
    verified = _Verified(fun, jitted, original, jit_kwargs)
    return _with_plan(verified, plan_under_options)


class _Verified:
    """`moefuse.jit(fun, verify=True)`: the fused jax.jit object, checked against the original on the
    first call of each signature. Every other attribute (`lower`, `trace`, `eval_shape`, ...) is the
    fused jax.jit object's own."""

    def __init__(self, fun: Callable[..., Any], jitted: Any, original: Any, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._jitted = jitted
        self._original = original
        self._seen: set[Any] = set()
        self._donated = bool(jit_kwargs.get("donate_argnums") or jit_kwargs.get("donate_argnames"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _signature(args, kwargs)
        if key in self._seen or disabled():
            return self._jitted(*args, **kwargs)
        ref_args, ref_kwargs = (
            jax.tree_util.tree_map(_copy, (args, kwargs)) if self._donated else (args, kwargs)
        )
        expected = self._original(*ref_args, **ref_kwargs)
        got = self._jitted(*args, **kwargs)
        check_outputs(expected, got)
        self._seen.add(key)
        return got

    def __getattr__(self, name: str) -> Any:
        if name == "_jitted":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._jitted, name)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:  # decorating a method, as jax.jit allows
        return self if obj is None else types.MethodType(self, obj)

    def clear_cache(self) -> None:
        """Clear both compiled programs; the next call of each signature is verified again."""
        self._jitted.clear_cache()
        self._original.clear_cache()
        self._seen.clear()


def _with_plan(jitted: Any, plan: Callable[..., Plan]) -> Any:
    """`jitted` (jax.jit's result, so jax.export and .lower keep working) with `.plan(*args)`."""
    jitted.plan = plan
    return jitted


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
    return _plan(fun, Options(), *args, **kwargs)


def _plan(fun: Callable[..., Any], options: Options, *args: Any, **kwargs: Any) -> Plan:
    _, level, target = _analysed(fun, args, kwargs, options)
    return Plan(fused=level.sites(), declined=level.declines(), platform=target.platform, chip=target.chip)


def rewritten_jaxpr(fun: Callable[..., Any], *args: Any, **kwargs: Any) -> C.ClosedJaxpr:
    """The jaxpr of the rewritten program at these arguments (arrays or ShapeDtypeStructs)."""
    traced, level, _ = _analysed(fun, args, kwargs, Options())
    return C.trace_to_closed_jaxpr(lambda *a: evaluate(level, a), [C.aval_of(x) for x in traced.dynamic])
