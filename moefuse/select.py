"""Kernel selection as data: which implementation of a fused op runs where.

The table is keyed by op and platform; rows are tried in order and the first available one
wins. Unavailable rows are kept so the CLI can show what is planned and why it is not used::

    kernel, why = select("route", "tpu")    # ("xla", "pallas_tpu: not built yet ...")
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelRow:
    op: str
    platform: str  # "cpu", "gpu", "tpu"
    kernel: str  # implementation name passed to the op
    available: bool
    note: str = ""


TABLE: tuple[KernelRow, ...] = (
    KernelRow("route", "tpu", "pallas_tpu", False, "Pallas TPU route kernel not built yet"),
    KernelRow("route", "tpu", "xla", True, "XLA composite"),
    KernelRow("route", "gpu", "pallas_gpu", False, "Pallas GPU route kernel not built yet"),
    KernelRow("route", "gpu", "xla", True, "XLA composite"),
    KernelRow("route", "cpu", "xla", True, "XLA composite"),
    KernelRow("moe", "tpu", "pallas_tpu", False, "Pallas TPU MoE kernel not built yet"),
    KernelRow("moe", "tpu", "xla", True, "sorted block schedule (XLA)"),
    KernelRow("moe", "gpu", "pallas_gpu", False, "Pallas GPU MoE kernel not built yet"),
    KernelRow("moe", "gpu", "xla", True, "sorted block schedule (XLA)"),
    KernelRow("moe", "cpu", "xla", True, "sorted block schedule (XLA)"),
)


def normalise_platform(platform: str) -> str:
    p = platform.lower()
    return {"cuda": "gpu", "rocm": "gpu", "host": "cpu"}.get(p, p)


def select(op: str, platform: str) -> tuple[str | None, str]:
    """(kernel, note) for `op` on `platform`; kernel is None when nothing acceptable exists."""
    platform = normalise_platform(platform)
    skipped = []
    for row in TABLE:
        if row.op != op or row.platform != platform:
            continue
        if row.available:
            return row.kernel, "; ".join(skipped)
        skipped.append(f"{row.kernel}: {row.note}")
    return None, f"no kernel for {op!r} on {platform!r}" + (f" ({'; '.join(skipped)})" if skipped else "")
