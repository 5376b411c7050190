"""The real-model suite: every case of every ``tests/real/cases/<lib>.py``, run in that library's venv.

Runs in moefuse's own venv without importing the libraries: the cases of one library that need the
same number of CPU devices run in one ``run_case.py`` subprocess of the library's venv (built by
``setup_venvs.py``), against this checkout; both tests of a case read that run's JSON.

- ``test_runs_and_equals_jax_jit``: moefuse neither crashes nor changes results (forward, and the
  gradients when the case trains; lowering only when it does not run). Must always pass.
- ``test_fuses_as_expected``: the Plan's fused ops equal ``case.expect``; ``xfail(strict=True)`` with
  the case's ``known_miss`` while that is set.

Not part of the default ``python -m pytest`` (marker ``real``, deselected in pyproject's addopts).

Example::

    python tests/real/setup_venvs.py && python -m pytest -m real tests/real
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.real.case import RealCase
from tests.real.cases import LIBS, load_cases
from tests.real.run_case import RESULT_PREFIX
from tests.real.setup_venvs import CACHE

pytestmark = pytest.mark.real

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
BATCH_TIMEOUT_S = int(os.environ.get("MOEFUSE_REAL_TIMEOUT", "1500"))
CASES: list[RealCase] = [case for lib in LIBS for case in load_cases(lib)]


@functools.cache
def batch_results(lib: str, devices: int) -> dict[str, dict[str, Any]] | str:
    """Run every case of ``lib`` needing ``devices`` devices in one subprocess: results by case id,
    or why the run failed (cached too, so one broken venv costs one run, not one per case)."""
    python = CACHE.python(lib)
    if not python.exists():
        return f"no venv for {lib} at {python}: run `python tests/real/setup_venvs.py {lib}` first"
    ids = [c.id for c in CASES if c.lib == lib and c.devices == devices]
    cmd = [str(python), str(HERE / "run_case.py"), "--root", str(REPO_ROOT), *ids]
    jaxpr_dir = os.environ.get("MOEFUSE_REAL_JAXPR_DIR")
    if jaxpr_dir:
        cmd += ["--jaxpr-dir", jaxpr_dir]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # run_case sets the device count
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=BATCH_TIMEOUT_S, env=env, cwd=REPO_ROOT
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            results[result["case"]] = result
    if proc.returncode != 0 or set(results) != set(ids):
        return (
            f"run_case.py for {lib} exited {proc.returncode} with results for {sorted(results)} of {ids}:\n"
            + proc.stderr[-8000:]
        )
    return results


def result_of(case: RealCase) -> dict[str, Any]:
    results = batch_results(case.lib, case.devices)
    if isinstance(results, str):
        pytest.fail(results)
    return results[case.id]


def _batch_group(case: RealCase) -> Any:
    """Under pytest-xdist (`--dist loadgroup`), one worker runs every test of a batch: one subprocess."""
    return pytest.mark.xdist_group(f"{case.lib}-{case.devices}")


@pytest.mark.parametrize("case", [pytest.param(c, marks=_batch_group(c)) for c in CASES],
                         ids=[c.id for c in CASES])
def test_runs_and_equals_jax_jit(case: RealCase) -> None:
    result = result_of(case)
    error = result["error"]
    assert error is None, (
        f"{error['stage']} raised {error['last_line']}\n{error['traceback']}\n{result['plan']}"
    )
    failed = [f"{c['what']}: {c['detail']}" for c in result["checks"] if not c["ok"]]
    assert not failed, "moefuse.jit differs from jax.jit:\n" + "\n".join(failed) + f"\n{result['plan']}"
    compared = {c["what"].split("[")[0] for c in result["checks"]}
    if case.runs:
        assert "forward" in compared, "no output was compared"
    if case.runs and case.trains:
        assert "grad" in compared, "no gradient was compared"


def _expectation(case: RealCase) -> Any:
    if case.known_miss is None:
        return pytest.param(case, marks=_batch_group(case))
    miss = pytest.mark.xfail(strict=True, reason=case.known_miss)
    return pytest.param(case, marks=[_batch_group(case), miss])


@pytest.mark.parametrize("case", [_expectation(c) for c in CASES], ids=[c.id for c in CASES])
def test_fuses_as_expected(case: RealCase) -> None:
    result = result_of(case)
    assert result["fused"] == list(case.expect), result["plan"] or result["error"]["last_line"]
