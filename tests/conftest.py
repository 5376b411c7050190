"""Set-up shared by every moefuse test.

- JAX gets 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``), set here before
  JAX starts, so sharding tests can build real meshes without an accelerator.
- ``moefuse`` is imported from the installed distribution, never from the source folder that
  ``python -m pytest`` puts on ``sys.path``: the tests exercise what ``pip install`` installed
  (``moefuse.patterns`` and ``moefuse.kernels`` only exist there). The repository root stays on
  ``sys.path`` for the ``tests.zoo`` helper package.
- Tests marked ``gpu`` are skipped unless JAX's default backend is a GPU.

Example::

    python -m pip install ".[test]" && python -m pytest
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

REPO_ROOT = Path(__file__).resolve().parent.parent


def _is_repo_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == REPO_ROOT
    except OSError:
        return False


def _import_installed_moefuse() -> None:
    """Import `moefuse` with the repository root off sys.path, so the installed copy wins."""
    if "moefuse" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not _is_repo_root(p)]
    try:
        import moefuse  # noqa: F401
    except ImportError as e:
        raise ImportError(
            'moefuse is not installed in this Python: run `python -m pip install ".[test]"` '
            '(or `-e ".[test]"` while developing) in the repository root first'
        ) from e
    finally:
        sys.path[:] = saved


_import_installed_moefuse()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import jax

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU; JAX's default backend is " + jax.default_backend())
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
