"""Which parametrized cases run in the default `pytest` and which in the slow tier (`-m slow`).

The default run must stay under 12 minutes on 2 cores, so a test with many similar, compile-heavy
cases keeps a few in the default run and moves the rest to the slow tier, which `.ci/run` also runs.

Example::

    @pytest.mark.parametrize("kw, t", default_run_keeps(GRAD_CASES, 0, 4))
    def test_grad(kw, t): ...
"""

from __future__ import annotations

import pytest


def default_run_keeps(cases: list, *keep: int) -> list:
    """`cases` (tuples of arguments) with every case whose index is not in `keep` marked slow."""
    if not keep or any(not 0 <= i < len(cases) for i in keep):
        raise ValueError(f"keep must name indices of the {len(cases)} cases, got {keep}")
    slow = pytest.mark.slow
    return [case if i in keep else pytest.param(*case, marks=slow) for i, case in enumerate(cases)]
