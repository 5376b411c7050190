"""The Plan: pure data describing what moefuse fused, declined and why.

A Plan drives the rewrite, the CLI and the tests::

    plan = moefuse.plan(model, x)
    for site in plan.fused:
        print(site.op, site.location, site.kernel, site.params)
    for d in plan.declined:
        print(d.location, d.reason)
    print(plan)          # a readable table
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Site:
    """One region that is replaced by a fused op."""

    op: str  # fused op name, e.g. "route"
    location: str  # "file:line" of the anchor equation in user code
    kernel: str  # chosen implementation, e.g. "xla"
    params: dict[str, Any]  # bound parameters (k, num_experts, score, ...)
    tiles: dict[str, int] = dataclasses.field(default_factory=dict)  # the kernel's tiles, e.g. block_tokens
    fallbacks: tuple[str, ...] = ()  # kernels passed over before this one, each with the reason
    scope: str = ""  # Flax module path / name stack, "" when none
    source: str = ""  # the source line at `location`, stripped
    path: str = ""  # where in the program: "" top level, else e.g. "scan/body"
    notes: tuple[str, ...] = ()  # how the site was read, where that is not plain from params

    def to_json(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Decline:
    """A candidate region that was not rewritten, with the reason in plain words."""

    op: str
    location: str
    reason: str
    scope: str = ""
    source: str = ""
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class Plan:
    """Fused sites and declined candidates of one traced program."""

    fused: list[Site] = dataclasses.field(default_factory=list)
    declined: list[Decline] = dataclasses.field(default_factory=list)
    platform: str = "cpu"
    chip: str = ""  # e.g. "v6e", "sm90"; "" when unknown or irrelevant

    def to_json(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "chip": self.chip,
            "fused": [s.to_json() for s in self.fused],
            "declined": [d.to_json() for d in self.declined],
        }

    def __str__(self) -> str:
        lines = [
            f"moefuse plan (platform {self.platform}{f' {self.chip}' if self.chip else ''}): "
            f"{len(self.fused)} fused, {len(self.declined)} declined"
        ]
        for s in self.fused:
            tail = f"kernel={s.kernel}" + "".join(f" {k}={v}" for k, v in s.tiles.items())
            lines += _entry("FUSED   ", s, tail, _fmt_params(s.params))
            lines += [f"           note: {note}" for note in s.notes]
            lines += [f"           fallback: {why}" for why in s.fallbacks]
        for d in self.declined:
            lines += _entry("DECLINED", d, "", f"reason: {d.reason}")
        return "\n".join(lines)


def _entry(kind: str, item: Site | Decline, tail: str, detail: str) -> list[str]:
    where = (
        item.location + (f" [{item.scope}]" if item.scope else "") + (f" in {item.path}" if item.path else "")
    )
    lines = [f"  {kind} {item.op:<8} {where}" + (f"  {tail}" if tail else ""), f"           {detail}"]
    if item.source:
        lines.append(f"           | {item.source}")
    return lines


def _fmt_params(params: dict[str, Any]) -> str:
    """Compact `key=value` list; False/None/empty values are left out (they are the defaults)."""
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in params.items() if v not in (False, None, (), []))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, (list, tuple)) and x and isinstance(x[0], str) for x in v):
            return ",".join(f"{x[0]}({','.join(_fmt_value(a) for a in x[1:])})" for x in v)
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _jsonable(obj: Any) -> Any:
    return strict_json(json.loads(json.dumps(obj, default=str)))


def strict_json(obj: Any) -> Any:
    """`obj` with non-finite floats as the strings "inf", "-inf", "nan": standard JSON has no
    Infinity or NaN (e.g. a route's group_fill of -inf), and tools like jq reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj
