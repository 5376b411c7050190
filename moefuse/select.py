"""Kernel selection as data: which implementation of a fused op runs where, with which tiles.

The engine knows no op by name. Each op package (`moefuse.kernels.<op>`) registers, when imported,
the implementation names it accepts and its rows of the selection table. For one fused site the
engine builds a `Request` (the op, its bound parameters, the abstract inputs in emit order) and a
`Target` (platform, chip, interpret mode, forced implementations), and `choose` tries the op's rows
for that platform in order: the first row that applies wins, and every row passed over says why.
Nothing acceptable -> the result has no kernel and the site is declined with the reasons.

Registration API (what `kernels/<op>/__init__.py` does)::

    from moefuse import select

    select.register_impls("route", ("reference", "xla", "pallas_tpu", "pallas_gpu"))
    select.register(
        select.KernelRow(
            op="route", platform="tpu", impl="pallas_tpu",
            chips=(),                          # Target.chip names ("v5e", "v6e", "v7x", "sm90" ...); () = any
            dtypes=("float32", "bfloat16"),    # dtype of the op's first input; () = any
            shape="E <= 1024",                 # printable shape class ...
            when=lambda req: req.inputs[0].shape[-1] <= 1024,   # ... and its test (None = any shape)
            fits=route_tpu_fits,               # (Request, Target) -> reason it cannot run, or None
            tiles=route_tpu_tiles,             # (Request, Target) -> {"block_tokens": 256}, or a dict
            note="Pallas TPU (Mosaic): one kernel per token block",
        )
    )

Rows are tried in registration order, so an op registers its best rows first and its XLA fallback
last. `available=False` keeps a planned row in the table (printed, never chosen) with its note as
the reason. The implementation gets a `Kernel` (name, tiles, interpret flag), e.g. through a
pattern's `emit(kernel, ...)`. Selection needs no hardware::

    target = select.target_for("tpu", device_kind="TPU v6 lite")        # chip "v6e"
    choice = select.choose(select.Request("route", params, (logits_sds,)), target)
    choice.kernel        # Kernel(impl="pallas_tpu", tiles=(("block_tokens", 256),), interpret=False)
    choice.fallbacks     # ("...: why a row before it was passed over", ...)
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

PLATFORMS = ("tpu", "gpu", "cpu")

Fits = Callable[["Request", "Target"], "str | None"]
Tiles = Callable[["Request", "Target"], Mapping[str, int]]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the program will run: platform, chip, and the user's kernel options."""

    platform: str  # "tpu" | "gpu" | "cpu"
    chip: str = ""  # "v5e", "v6e", "v7x", "v5p", "v4"; "sm80", "sm90", "sm100"; "" when unknown
    device_kind: str = ""  # as JAX reports it, e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"
    interpret: bool = False  # run Pallas kernels in interpret mode (numerics on a CPU host)
    forced: tuple[tuple[str, str], ...] = ()  # (op, impl) the user forced with kernels={op: impl}

    def forced_impl(self, op: str) -> str | None:
        return dict(self.forced).get(op)


@dataclasses.dataclass(frozen=True)
class Request:
    """One fused site asking for a kernel: op name, bound parameters (Plan data), inputs in emit order."""

    op: str
    params: Mapping[str, Any]
    inputs: tuple[jax.ShapeDtypeStruct, ...]

    @property
    def dtype(self) -> str:
        return str(self.inputs[0].dtype) if self.inputs else ""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The chosen implementation of a fused op, as its emit function receives it."""

    impl: str
    tiles: tuple[tuple[str, int], ...] = ()
    interpret: bool = False

    def tile(self, name: str, default: int) -> int:
        return dict(self.tiles).get(name, default)


@dataclasses.dataclass(frozen=True)
class KernelRow:
    """One row of the selection table (see the module docstring)."""

    op: str
    platform: str
    impl: str
    chips: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    shape: str = "any"
    when: Callable[[Request], bool] | None = None
    fits: Fits | None = None
    tiles: Tiles | Mapping[str, int] | None = None
    available: bool = True
    note: str = ""
    # configurations to compile for this row's chips (tests/compile): (name, fn, ShapeDtypeStruct args)
    examples: Callable[[], Sequence[tuple[str, Callable[..., Any], tuple]]] | None = None

    def problem(self, req: Request, target: Target) -> str | None:
        """Why this row cannot serve `req` on `target`, or None when it can."""
        if not self.available:
            return self.note or "not available"
        if self.chips and target.chip not in self.chips:
            return f"chip {target.chip or 'unknown'} is not one of {', '.join(self.chips)}"
        if self.dtypes and req.dtype not in self.dtypes:
            return f"dtype {req.dtype} is not one of {', '.join(self.dtypes)}"
        if self.when is not None and not self.when(req):
            return f"shape is not in class {self.shape}"
        return None if self.fits is None else self.fits(req, target)

    def kernel(self, req: Request, target: Target) -> Kernel:
        tiles = self.tiles(req, target) if callable(self.tiles) else (self.tiles or {})
        return Kernel(self.impl, tuple(sorted(tiles.items())), target.interpret and self.platform != "cpu")

    def describe_tiles(self) -> str:
        if self.tiles is None:
            return ""
        if callable(self.tiles):
            return (self.tiles.__doc__ or self.tiles.__name__).strip().splitlines()[0]
        return " ".join(f"{k}={v}" for k, v in self.tiles.items())


@dataclasses.dataclass(frozen=True)
class Choice:
    """The result of `choose`: the kernel (None when no row applies) and why earlier rows were passed over."""

    kernel: Kernel | None
    fallbacks: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.fallbacks)


_ROWS: list[KernelRow] = []
_IMPLS: dict[str, tuple[str, ...]] = {}
_loaded = False


def register(*rows: KernelRow) -> None:
    """Append rows to the selection table (an op package calls this when it is imported)."""
    for row in rows:
        if row.platform not in PLATFORMS:
            raise ValueError(f"KernelRow platform must be one of {PLATFORMS}, got {row.platform!r}")
        if row not in _ROWS:
            _ROWS.append(row)


def register_impls(op: str, names: Sequence[str]) -> None:
    """The implementation names `op` accepts (what `kernels={op: name}` may force)."""
    _IMPLS[op] = tuple(names)


def _load_ops() -> None:
    """Import every op package under moefuse.kernels, so their rows are registered."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    kernels = importlib.import_module("moefuse.kernels")
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.ispkg:
            importlib.import_module(f"moefuse.kernels.{info.name}")


def rows(op: str | None = None, platform: str | None = None) -> tuple[KernelRow, ...]:
    """The selection table (all registered ops), optionally only one op and/or platform."""
    _load_ops()
    return tuple(
        r for r in _ROWS if (op is None or r.op == op) and (platform is None or r.platform == platform)
    )


def impls(op: str) -> tuple[str, ...]:
    _load_ops()
    return _IMPLS.get(op, ())


def ops() -> tuple[str, ...]:
    _load_ops()
    return tuple(dict.fromkeys([r.op for r in _ROWS] + list(_IMPLS)))


def check_forced(kernels: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """`kernels={op: impl}` as Target.forced; ValueError naming the valid ops / impls otherwise."""
    if not kernels:
        return ()
    for op, impl in kernels.items():
        if op not in ops():
            raise ValueError(f"kernels: unknown op {op!r}; valid ops: {', '.join(sorted(ops()))}")
        if impl not in impls(op):
            raise ValueError(
                f"kernels: unknown implementation {impl!r} for {op!r}; valid: {', '.join(impls(op))}"
            )
    return tuple(sorted(kernels.items()))


def choose(req: Request, target: Target) -> Choice:
    """The first row of `req.op` that applies on `target` (a forced implementation first)."""
    fallbacks: list[str] = []
    forced = target.forced_impl(req.op)
    if forced is not None:
        candidates = [r for r in rows(req.op) if r.impl == forced]
        candidates.sort(key=lambda r: r.platform != target.platform)  # its rows for this platform first
        for row in candidates:
            why = row.problem(req, target)
            if why is None:
                return Choice(row.kernel(req, target))
            fallbacks.append(f"forced {forced} ({row.platform}): {why}")
        if not candidates:
            fallbacks.append(f"forced {forced}: no row in the selection table")
    for row in rows(req.op, target.platform):
        why = row.problem(req, target)
        if why is None:
            return Choice(row.kernel(req, target), tuple(fallbacks))
        fallbacks.append(f"{row.impl}: {why}")
    if not rows(req.op, target.platform):
        fallbacks.append(f"no kernel for {req.op!r} on {target.platform!r}")
    return Choice(None, tuple(fallbacks))


def normalise_platform(platform: str) -> str:
    p = platform.lower()
    return {"cuda": "gpu", "rocm": "gpu", "host": "cpu"}.get(p, p)


_TPU_KINDS = (  # device kind (lower case, spaces removed) -> chip
    (r"v7x|tpu7x|tpu7", "v7x"),
    (r"v6lite|v6e", "v6e"),
    (r"v5lite|v5e", "v5e"),
    (r"v5p|v5$", "v5p"),
    (r"v4", "v4"),
)
_GPU_KINDS = (("b200", "sm100"), ("b100", "sm100"), ("h200", "sm90"), ("h100", "sm90"), ("h800", "sm90"),
              ("l40", "sm89"), ("l4", "sm89"), ("a100", "sm80"), ("a10", "sm86"))  # fmt: skip


def chip_of(platform: str, device_kind: str = "", compute_capability: str = "") -> str:
    """The chip name rows key on: TPU generation from the device kind, GPU "smXY" from the compute
    capability ("9.0" -> "sm90") or, for abstract devices, from the device kind; "" when unknown."""
    kind = device_kind.lower().replace(" ", "")
    if platform == "tpu":
        return next((chip for pat, chip in _TPU_KINDS if re.search(pat, kind)), "")
    if platform == "gpu":
        if compute_capability:
            return "sm" + compute_capability.replace(".", "")
        return next((chip for name, chip in _GPU_KINDS if name in kind), "")
    return ""


def target_for(
    platform: str,
    *,
    device_kind: str = "",
    compute_capability: str = "",
    interpret: bool = False,
    kernels: Mapping[str, str] | None = None,
) -> Target:
    """A Target for `platform` ("tpu", "gpu", "cpu"; "cuda"/"rocm" mean "gpu")."""
    platform = normalise_platform(platform)
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    return Target(
        platform,
        chip_of(platform, device_kind, compute_capability),
        device_kind,
        interpret,
        check_forced(kernels),
    )


def format_table() -> str:
    """The selection table as Markdown, for `moefuse kernels`: rows in the order they are tried."""
    out = [
        "| op | platform | chips | dtypes | shape | kernel | tiles | status | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen: set[tuple[str, str]] = set()
    for r in rows():
        first = (r.op, r.platform) not in seen and r.available
        if first:
            seen.add((r.op, r.platform))
        status = "first choice" if first else "fallback" if r.available else "not built"
        out.append(
            f"| `{r.op}` | {r.platform} | {', '.join(r.chips) or 'any'} | {', '.join(r.dtypes) or 'any'} | "
            f"{r.shape} | {r.impl} | {r.describe_tiles()} | {status} | {r.note} |"
        )
    return "\n".join(out)
