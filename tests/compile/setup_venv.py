"""Build (or reuse) the cached venv of a compile tier ("tpu": libtpu; "cuda": the jax CUDA plugin), with uv.

Each tier's requirements are ``tests/compile/requirements/<tier>.txt``; moefuse's own runtime
dependencies (``[project].dependencies`` of this checkout's pyproject.toml) are resolved with them.
moefuse itself is NOT installed: the compile scripts import it from their checkout
(``tests/compile/harness.py``), so one cached venv serves every checkout. The venv is built with the
Python that runs this script (CI: the Python 3.11 venv's, whose JAX the requirement files pin).

The venv lives at ``${MOEFUSE_COMPILE_CACHE:-~/.cache/moefuse-compile}/<tier>``; it is reused while its
stamp (a hash of the requirement file, the moefuse dependencies and the Python version) matches, else
rebuilt in a temporary folder and moved into place, under a per-tier lock. Every ``name==version`` of the
requirement file must come out installed at that version, or the build fails. Built by tests/venv_build.py, as
tests/real/setup_venvs.py builds its venvs.

Example::

    python tests/compile/setup_venv.py              # both tiers
    python tests/compile/setup_venv.py tpu --force
    python tests/compile/setup_venv.py cuda --print-python    # the venv's interpreter, nothing built
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's `tests`
from tests.venv_build import VenvCache, VenvSpec, build_venv, moefuse_dependencies  # noqa: E402

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"
REPO_ROOT = Path(__file__).resolve().parents[2]
TIERS = ("tpu", "cuda")
STAMP = ".moefuse-compile-stamp"
FORMAT = 1  # bump when the build steps change, to rebuild every venv
CACHE = VenvCache("MOEFUSE_COMPILE_CACHE", "moefuse-compile")


def requirements(tier: str) -> Path:
    path = REQUIREMENTS / f"{tier}.txt"
    if not path.is_file():
        raise SystemExit(f"no requirements file {path}")
    return path


def base_python() -> str:
    """The interpreter the venv is made from: this one's base (a venv's python is not one to copy)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def stamp_of(tier: str) -> str:
    h = hashlib.sha256(f"format {FORMAT}\npython {sys.version}\n{base_python()}\n".encode())
    for dep in moefuse_dependencies():
        h.update(f"moefuse needs {dep}\n".encode())
    h.update(requirements(tier).read_bytes())
    return h.hexdigest()


def pins(tier: str) -> dict[str, str]:
    """name -> version of every `name==version` (or `name[extra]==version`) line of the requirement file."""
    found = {}
    for line in requirements(tier).read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)\s*(?:#.*)?", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def note_jax_version(tier: str) -> None:
    """Say so when the tier's JAX is not the calling Python's (the main venv's, which the tests use)."""
    import importlib.metadata as md

    try:
        ours = md.version("jax")
    except md.PackageNotFoundError:
        return
    pinned = pins(tier).get("jax")
    if pinned and pinned != ours:
        print(f"[{tier}] note: this venv has jax {pinned}, the calling Python jax {ours}: the compile checks "
              f"cover {pinned} (update {requirements(tier).relative_to(REPO_ROOT)} to follow)", flush=True)


def build(tier: str, force: bool = False) -> Path:
    """Make `tier`'s venv current; returns its folder."""
    installs = [(f"install {requirements(tier).name} (+ moefuse's dependencies)",
                 ["-r", str(requirements(tier)), *moefuse_dependencies()])]
    spec = VenvSpec(label=tier, target=CACHE.venv(tier), stamp=stamp_of(tier), stamp_file=STAMP,
                    python=base_python(), installs=installs, pins=pins(tier))
    return build_venv(spec, force=force)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tiers", nargs="*", metavar="tier", help=f"of {', '.join(TIERS)} (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    parser.add_argument("--print-python", action="store_true",
                        help="print each venv's interpreter; build none")
    args = parser.parse_args(argv)
    unknown = set(args.tiers) - set(TIERS)
    if unknown:
        parser.error(f"unknown tiers {sorted(unknown)}; valid: {', '.join(TIERS)}")
    if args.print_python:
        for tier in args.tiers or TIERS:
            print(CACHE.python(tier))
        return
    start = time.monotonic()
    for tier in args.tiers or TIERS:
        build(tier, force=args.force)
        note_jax_version(tier)
    print(f"compile venvs ready in {time.monotonic() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
