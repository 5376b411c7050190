"""What the deviceless compile scripts share: moefuse from the checkout, and the compile loop.

moefuse is imported from the checkout without installing it (`use_checkout`, through tests/checkout.py,
as tests/real/run_case.py does): the compile venvs hold only JAX and libtpu or the CUDA plugin. Call it
before anything imports moefuse.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run as a script: the repo's `tests`
from tests import checkout  # noqa: E402  (the import hook the real-model tier uses too)

# platform -> {(op/impl, example): (substring of the error, why)}: configurations known not to compile
# (nor lower: tests/compile/test_examples.py). One that compiles again fails the run, so that its entry
# is removed with the fix.
KNOWN_FAILURES: dict[str, dict[tuple[str, str], tuple[str, str]]] = {
    "tpu": {},
    "gpu": {},
}


def use_checkout(root: Path = REPO_ROOT) -> None:
    """Import moefuse from `root` (default: the checkout this file is in), ahead of any installed copy."""
    checkout.use_checkout(root)


def chosen_targets(doc: str, names: Iterable[str], what: str, argv: list[str] | None) -> list[str]:
    """The targets named on the command line (each one of `names`; none named: all), `--help` from doc."""
    names = list(names)
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(what, nargs="*", help=f"of {', '.join(names)} (default: all)")
    chosen = getattr(parser.parse_args(argv), what)
    unknown = set(chosen) - set(names)
    if unknown:
        parser.error(f"unknown {what} {sorted(unknown)}; valid: {', '.join(names)}")
    return chosen or names


def print_versions(*names: str) -> None:
    """One line: Python and the installed versions of `names` (what the compile ran with)."""
    import importlib.metadata as md

    found = []
    for n in names:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            found.append(f"{n} (not installed)")
    print(f"python {sys.version.split()[0]}: " + ", ".join(found), flush=True)


def compile_rows(platform: str, targets: Iterable[tuple[str, str, Any]],
                 known_failures: Mapping[tuple[str, str], tuple[str, str]] | None = None) -> int:
    """Compile every example of every `platform` row for each target (name, chip, one-device Mesh of a
    deviceless topology), printing one line per (target, row, example); returns the exit status.

    known_failures: {(op/impl, example): (substring of the error, why)}. Such an example failing with that
    error is reported as a known failure and does not count; passing, it counts (remove the entry).
    Nothing to compile at all counts as a failure too.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moefuse import select

    known_failures = known_failures or {}
    failures = tried = known_failed = 0
    for name, chip, mesh in targets:
        sharding = NamedSharding(mesh, P())
        begin = time.perf_counter()
        for row in select.rows(platform=platform):
            if row.examples is None or (row.chips and chip not in row.chips):
                continue
            for label, fn, args in row.examples():
                start = time.perf_counter()
                error = ""
                try:
                    with jax.set_mesh(mesh):
                        jax.jit(fn).lower(
                            *[jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
                        ).compile()
                except Exception as e:  # noqa: BLE001 - report every configuration, then fail
                    first = (str(e).strip().splitlines() or [""])[0]
                    error = f"{type(e).__name__}: {first[:300]}"
                tried += 1
                known = known_failures.get((f"{row.op}/{row.impl}", label))
                if known and error and known[0] in error:
                    known_failed += 1
                    status = f"known failure ({known[1]}): {error}"
                elif known and not error:
                    failures += 1
                    status = "FAILED: compiled, but is listed as a known failure (remove it from the list)"
                elif error:
                    failures += 1
                    status = f"FAILED {error}"
                else:
                    status = "ok"
                print(f"{name} {row.op}/{row.impl} {label}: {status} ({time.perf_counter() - start:.1f}s)",
                      flush=True)
        print(f"{name}: done in {time.perf_counter() - begin:.1f}s", flush=True)
    if not tried:
        print(f"nothing to compile: no {platform} row has examples", flush=True)
        return 1
    print(f"{tried} configurations: {tried - failures - known_failed} compiled, {failures} failed, "
          f"{known_failed} known failures", flush=True)
    return 1 if failures else 0
