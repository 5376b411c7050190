"""Cached, stamped venvs built with uv: what tests/real/setup_venvs.py and tests/compile/setup_venv.py share.

A venv is current while the stamp file in it holds the stamp its caller computed (a hash of its
requirement files, moefuse's dependencies, the Python); otherwise it is built in a temporary folder
next to it and moved into place, under a lock per venv, and the build fails unless every pinned
package came out at its version::

    build_venv(VenvSpec(label="tpu", target=cache / "tpu", stamp=stamp, stamp_file=".stamp",
                        python=base_python(), installs=[("install tpu.txt", ["-r", "tpu.txt"])],
                        pins={"jax": "0.10.2"}))
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class VenvCache:
    """The folder a family of venvs lives in: ``$env_var``, else ``~/.cache/<default>``.

    Example: ``VenvCache("MOEFUSE_REAL_CACHE", "moefuse-real").python("maxtext")``."""

    env_var: str
    default: str

    def dir(self) -> Path:
        return Path(os.environ.get(self.env_var) or Path.home() / ".cache" / self.default)

    def venv(self, name: str) -> Path:
        return self.dir() / name

    def python(self, name: str) -> Path:
        """The interpreter of venv `name` (which may not be built yet)."""
        return self.venv(name) / "bin" / "python"


@dataclasses.dataclass(frozen=True)
class VenvSpec:
    """One venv to make current."""

    label: str  # prefix of its progress lines: "[label] ..."
    target: Path  # the venv's folder
    stamp: str  # what the stamp file must hold for the venv to be reused
    stamp_file: str  # the stamp file's name inside the venv
    python: str  # the interpreter the venv is made from
    installs: Sequence[tuple[str, list[str]]]  # (what, `uv pip install` arguments), in order
    pins: dict[str, str]  # name -> version every build must come out with


def moefuse_dependencies() -> list[str]:
    """`[project].dependencies` of this checkout's pyproject.toml."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def uv_command() -> list[str]:
    """uv, installed into the calling Python with pip if it is not on PATH nor importable."""
    found = shutil.which("uv")
    if found:
        return [found]
    probe = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uv"], check=True)
    return [sys.executable, "-m", "uv"]


def step(label: str, what: str, cmd: list[str]) -> None:
    """Run cmd, printing its start and duration; its output only when it fails (then exit)."""
    start = time.monotonic()
    print(f"[{label}] {what} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"[{label}] {what} failed (exit {proc.returncode}): {' '.join(cmd)}")
    print(f"[{label}] {what}: done in {time.monotonic() - start:.1f}s", flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_pins(label: str, python: Path, pins: dict[str, str]) -> None:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([str(python), "-c", code, *pins], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    wrong = {n: v for n, v in got.items() if v != pins[n]}
    if wrong:
        raise SystemExit(f"[{label}] pinned versions not installed: got {wrong}, want {pins}")
    print(f"[{label}] versions: " + ", ".join(f"{n} {v}" for n, v in got.items()), flush=True)


def build_venv(spec: VenvSpec, force: bool = False) -> Path:
    """Make the venv of `spec` current; returns its folder."""
    target, label = spec.target, spec.label
    stamp_path = target / spec.stamp_file
    with locked(target.parent / f".{target.name}.lock"):
        if not force and stamp_path.is_file() and stamp_path.read_text().strip() == spec.stamp:
            print(f"[{label}] venv up to date: {target}", flush=True)
            return target
        start = time.monotonic()
        uv = uv_command()
        tmp = target.parent / f".{target.name}.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        python = tmp / "bin" / "python"
        # bytecode compiled now, not at the first import of every run (MaxText: ~2 minutes otherwise)
        pip = [*uv, "pip", "install", "--compile-bytecode", "--python", str(python)]
        step(label, "uv venv", [*uv, "venv", "-q", "--relocatable", "--python", spec.python, str(tmp)])
        for what, args in spec.installs:
            step(label, what, [*pip, *args])
        check_pins(label, python, spec.pins)
        (tmp / spec.stamp_file).write_text(spec.stamp + "\n")
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
        print(f"[{label}] venv built in {time.monotonic() - start:.1f}s: {target}", flush=True)
        return target
