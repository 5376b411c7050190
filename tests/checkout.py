"""Import moefuse from a checkout without installing it: the hook the real-model and compile tiers share.

Their cached venvs hold no moefuse, so one venv serves every checkout. pyproject's
``[tool.setuptools.package-dir]`` maps ``moefuse.kernels`` -> ``kernels/`` and ``moefuse.patterns`` ->
``patterns/``, which a plain sys.path entry cannot express; this finder follows that mapping::

    use_checkout(Path("/path/to/checkout"))   # before anything imports moefuse
    import moefuse
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tomllib
from pathlib import Path
from typing import Any


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``moefuse`` and its mapped subpackages (``moefuse.kernels`` -> ``kernels/``) in a checkout."""

    def __init__(self, root: Path) -> None:
        with open(root / "pyproject.toml", "rb") as f:
            package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
        self.packages = {name: (root / rel).resolve() for name, rel in package_dir.items()}

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = self.packages.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def use_checkout(root: Path) -> None:
    """Import moefuse from `root`, ahead of any installed copy; raises if moefuse is already imported."""
    if "moefuse" in sys.modules:
        raise RuntimeError("use_checkout must run before moefuse is imported")
    sys.meta_path.insert(0, CheckoutFinder(root))
