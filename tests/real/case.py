"""The interface between the real-model runner and the per-library case modules.

A case module ``tests/real/cases/<lib>.py`` defines ``CASES: tuple[RealCase, ...]``. It must import
without the library installed: the library is imported inside ``build`` only, which runs in that
library's own venv (see ``tests/real/README.md``).

Example::

    def _build_dense() -> Built:
        import jax, jax.numpy as jnp
        w = jnp.ones((32, 8))
        return Built(fn=lambda w, x: x @ w, args=(w, jnp.ones((4, 32))))

    CASES = (RealCase(lib="mylib", name="dense", build=_build_dense, known_miss="no router found"),)

A builder may take ``size: Size = TINY`` (the test suite calls ``build()``, the benchmark
``build(size=CPU_REALISTIC)``); one without that parameter runs at its own tiny size only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Size:
    """The layer's dimensions: tokens in the batch, model width, expert FFN width, experts, top-k."""

    tokens: int = 32
    hidden: int = 32
    ffn: int = 64
    experts: int = 8
    top_k: int = 2


TINY = Size()  # the test suite's size
CPU_REALISTIC = Size(tokens=256, hidden=256, ffn=512, experts=16, top_k=2)  # benchmarks/real_models.py


@dataclasses.dataclass(frozen=True)
class Built:
    """A built case: ``fn(*args)`` is the library's forward as a pure function of arrays."""

    fn: Callable[..., Any]  # pure function of arrays
    args: tuple  # arrays / pytrees of arrays
    # e.g. lambda: jax.set_mesh(mesh), or the library's `with cfg.mesh:`; the runner enters it around
    # tracing, jax.jit, moefuse.jit and moefuse.plan
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclasses.dataclass(frozen=True)
class RealCase:
    """One real library MoE path, and what moefuse must do with it."""

    lib: str  # "maxtext" | "easydel" | "tpu_inference" | "sglang_jax"
    name: str  # short, e.g. "dense_dropless", "mixtral_fused_moe"
    build: Callable[..., Built]  # build() or build(size=Size(...)); imports the library INSIDE
    expect: tuple[str, ...] = ("route", "moe")  # the fused ops moefuse must report, in program order
    known_miss: str | None = None  # set while moefuse does not fuse it yet: the true reason (Plan text)
    trains: bool = True  # also compare gradients (w.r.t. every floating leaf of args)
    runs: bool = True  # False: only trace + lower (e.g. ragged_all_to_all on XLA:CPU)
    devices: int = 1  # CPU devices needed (the runner sets XLA_FLAGS before JAX starts)

    @property
    def id(self) -> str:
        """``lib/name``, the case's name on the command line and in test ids."""
        return f"{self.lib}/{self.name}"
