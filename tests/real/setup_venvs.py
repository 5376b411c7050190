"""Build (or reuse) one cached Python 3.12 venv per real-model library, with uv.

Each library ``<lib>`` has up to three files in ``tests/real/requirements/`` (format in
``tests/real/README.md``):

- ``<lib>.txt``: requirements installed with their dependencies (required);
- ``<lib>.nodeps.txt``: requirements installed afterwards with ``--no-deps`` (optional);
- ``<lib>.overrides.txt``: uv ``--override`` pins applied while resolving ``<lib>.txt`` (optional).

moefuse's own runtime dependencies (``[project].dependencies`` of this checkout's pyproject.toml) are
resolved together with ``<lib>.txt``. moefuse itself is NOT installed: ``run_case.py --root DIR``
imports it from any checkout, so one cached venv serves every checkout at once.

The venv lives at ``${MOEFUSE_REAL_CACHE:-~/.cache/moefuse-real}/<lib>``; it is reused while its stamp
(a hash of those files, the moefuse dependencies and the Python version) matches, else rebuilt in a
temporary folder and moved into place, under a per-library lock. jax, jaxlib and flax must come out at
the pinned versions (``PINS``), or the build fails.

Example::

    python tests/real/setup_venvs.py              # every library that has a requirements file
    python tests/real/setup_venvs.py maxtext --force
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo's `tests`
from tests.venv_build import VenvCache, VenvSpec, build_venv, moefuse_dependencies  # noqa: E402

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"
REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON_VERSION = "3.12.1"
PINS = {"jax": "0.12.0.1", "jaxlib": "0.12.0.1", "flax": "0.12.12"}
STAMP = ".moefuse-real-stamp"
FORMAT = 2  # bump when the build steps change, to rebuild every venv
CACHE = VenvCache("MOEFUSE_REAL_CACHE", "moefuse-real")


@dataclasses.dataclass(frozen=True)
class LibFiles:
    """The requirement files of one library."""

    lib: str
    requirements: Path
    nodeps: Path | None
    overrides: Path | None

    @classmethod
    def of(cls, lib: str) -> LibFiles:
        main = REQUIREMENTS / f"{lib}.txt"
        if not main.is_file():
            raise SystemExit(f"no requirements file {main}")
        optional = [REQUIREMENTS / f"{lib}.{kind}.txt" for kind in ("nodeps", "overrides")]
        return cls(lib, main, *(p if p.is_file() else None for p in optional))

    def paths(self) -> list[Path]:
        return [p for p in (self.requirements, self.nodeps, self.overrides) if p is not None]


def all_libs() -> list[str]:
    return sorted(p.stem for p in REQUIREMENTS.glob("*.txt") if "." not in p.stem)


def stamp_of(files: LibFiles) -> str:
    h = hashlib.sha256(f"format {FORMAT}\npython {PYTHON_VERSION}\n".encode())
    for dep in moefuse_dependencies():
        h.update(f"moefuse needs {dep}\n".encode())
    for p in files.paths():
        h.update(f"== {p.name}\n".encode() + p.read_bytes())
    return h.hexdigest()


def python312() -> str:
    env = dict(os.environ, PYENV_VERSION=PYTHON_VERSION)
    out = subprocess.run(
        ["python3.12", "-c", "import sys; print(sys.executable)"], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"PYENV_VERSION={PYTHON_VERSION} python3.12 does not run: {out.stderr.strip()}")
    return os.path.realpath(out.stdout.strip())


def build(lib: str, force: bool = False) -> Path:
    """Make ``lib``'s venv current; returns its folder."""
    files = LibFiles.of(lib)
    overrides = ["--override", str(files.overrides)] if files.overrides else []
    installs = [(f"install {files.requirements.name} (+ moefuse's dependencies)",
                 [*overrides, "-r", str(files.requirements), *moefuse_dependencies()])]
    if files.nodeps:
        installs.append((f"install --no-deps {files.nodeps.name}", ["--no-deps", "-r", str(files.nodeps)]))
    spec = VenvSpec(label=lib, target=CACHE.venv(lib), stamp=stamp_of(files), stamp_file=STAMP,
                    python=python312(), installs=installs, pins=PINS)
    return build_venv(spec, force=force)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libs", nargs="*", help=f"default: every library in {REQUIREMENTS}")
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    args = parser.parse_args(argv)
    start = time.monotonic()
    for lib in args.libs or all_libs():
        build(lib, force=args.force)
    print(f"all venvs ready in {time.monotonic() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
