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
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"
REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON_VERSION = "3.12.1"
PINS = {"jax": "0.12.0.1", "jaxlib": "0.12.0.1", "flax": "0.12.12"}
STAMP = ".moefuse-real-stamp"
FORMAT = 2  # bump when the build steps change, to rebuild every venv


def cache_dir() -> Path:
    return Path(os.environ.get("MOEFUSE_REAL_CACHE") or Path.home() / ".cache" / "moefuse-real")


def venv_python(lib: str) -> Path:
    """The interpreter of ``lib``'s venv (which may not be built yet)."""
    return cache_dir() / lib / "bin" / "python"


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


def moefuse_dependencies() -> list[str]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def stamp_of(files: LibFiles) -> str:
    h = hashlib.sha256(f"format {FORMAT}\npython {PYTHON_VERSION}\n".encode())
    for dep in moefuse_dependencies():
        h.update(f"moefuse needs {dep}\n".encode())
    for p in files.paths():
        h.update(f"== {p.name}\n".encode() + p.read_bytes())
    return h.hexdigest()


def uv_command() -> list[str]:
    """uv, installed into the calling Python with pip if it is not on PATH nor importable."""
    found = shutil.which("uv")
    if found:
        return [found]
    probe = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uv"], check=True)
    return [sys.executable, "-m", "uv"]


def python312() -> str:
    env = dict(os.environ, PYENV_VERSION=PYTHON_VERSION)
    out = subprocess.run(
        ["python3.12", "-c", "import sys; print(sys.executable)"], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"PYENV_VERSION={PYTHON_VERSION} python3.12 does not run: {out.stderr.strip()}")
    return os.path.realpath(out.stdout.strip())


def step(lib: str, what: str, cmd: list[str]) -> None:
    start = time.monotonic()
    print(f"[{lib}] {what} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"[{lib}] {what} failed (exit {proc.returncode}): {' '.join(cmd)}")
    print(f"[{lib}] {what}: done in {time.monotonic() - start:.1f}s", flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_pins(lib: str, python: Path) -> None:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([str(python), "-c", code, *PINS], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    wrong = {n: v for n, v in got.items() if v != PINS[n]}
    if wrong:
        raise SystemExit(f"[{lib}] pinned versions not installed: got {wrong}, want {PINS}")
    print(f"[{lib}] versions: " + ", ".join(f"{n} {v}" for n, v in got.items()), flush=True)


def build(lib: str, force: bool = False) -> Path:
    """Make ``lib``'s venv current; returns its folder."""
    files = LibFiles.of(lib)
    target = cache_dir() / lib
    stamp = stamp_of(files)
    with locked(cache_dir() / f".{lib}.lock"):
        if not force and (target / STAMP).is_file() and (target / STAMP).read_text().strip() == stamp:
            print(f"[{lib}] venv up to date: {target}", flush=True)
            return target
        start = time.monotonic()
        uv = uv_command()
        tmp = cache_dir() / f".{lib}.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        python = tmp / "bin" / "python"
        # compiled now, not at the first import of every run (MaxText: ~2 minutes of imports otherwise)
        pip = [*uv, "pip", "install", "--compile-bytecode", "--python", str(python)]
        step(lib, "uv venv", [*uv, "venv", "-q", "--relocatable", "--python", python312(), str(tmp)])
        overrides = ["--override", str(files.overrides)] if files.overrides else []
        step(
            lib,
            f"install {files.requirements.name} (+ moefuse's dependencies)",
            [*pip, *overrides, "-r", str(files.requirements), *moefuse_dependencies()],
        )
        if files.nodeps:
            step(lib, f"install --no-deps {files.nodeps.name}", [*pip, "--no-deps", "-r", str(files.nodeps)])
        check_pins(lib, python)
        (tmp / STAMP).write_text(stamp + "\n")
        if target.exists():
            old = cache_dir() / f".{lib}.old-{os.getpid()}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
        print(f"[{lib}] venv built in {time.monotonic() - start:.1f}s: {target}", flush=True)
        return target


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
