"""One module per library, each defining ``CASES: tuple[RealCase, ...]`` (see ``tests/real/case.py``).

The modules import without their library; ``LIBS`` names them, in the order the suite runs them.

Example::

    from tests.real.cases import load_cases
    print([c.id for c in load_cases("maxtext")])
"""

from __future__ import annotations

import importlib

from tests.real.case import RealCase

LIBS: tuple[str, ...] = ("maxtext", "easydel", "tpu_inference", "sglang_jax")


def load_cases(lib: str) -> tuple[RealCase, ...]:
    """The ``CASES`` of ``tests/real/cases/<lib>.py``; empty while that module does not exist yet."""
    try:
        module = importlib.import_module(f"tests.real.cases.{lib}")
    except ModuleNotFoundError as e:
        if e.name != f"tests.real.cases.{lib}":
            raise
        return ()
    return tuple(module.CASES)
