"""Let tpu-inference 0.32.0's JAX layers import on CPU without vllm, torch or torchax.

tpu-inference imports vllm (and through it CUDA torch) at module level all over, but its JAX MoE layer
never calls into them. A meta-path finder answers every ``vllm.*``, ``torch.*`` and ``torchax.*``
import with a permissive stand-in module: any attribute is a stand-in class, which can be subclassed,
called, used as a decorator (returns what it decorates) or indexed. ``TPU_*`` variables keep its
import from asking a cloud metadata server what it runs on.

    from tests.real.shims import tpu_inference_cpu
    tpu_inference_cpu.activate()
    from tpu_inference.layers.jax.moe.moe import JaxMoE
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any

STUBBED_PACKAGES = ("vllm", "torch", "torchax")
CPU_ENVIRONMENT = {"TPU_ACCELERATOR_TYPE": "cpu", "TPU_NAME": "cpu", "TPU_WORKER_ID": "0"}


class _StandInMeta(type):
    """Classes whose missing attributes, calls and items are stand-ins too."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return stand_in_class(name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator
        return super().__call__()

    def __getitem__(cls, item: Any) -> Any:
        return cls

    def __or__(cls, other: Any) -> Any:
        return cls

    __ror__ = __or__


class StandIn(metaclass=_StandInMeta):
    """An instance of a stand-in class: every attribute, call and item is a stand-in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return stand_in_class(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return StandIn()

    def __getitem__(self, item: Any) -> Any:
        return StandIn()

    def __iter__(self) -> Any:
        return iter(())


def stand_in_class(name: str) -> type:
    return _StandInMeta(name, (StandIn,), {})


class StandInModule(types.ModuleType):
    """A package whose every attribute is a stand-in class."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = stand_in_class(name)
        setattr(self, name, value)
        return value


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the stubbed packages and all their submodules to `StandInModule`s."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] not in STUBBED_PACKAGES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def activate() -> None:
    """Set the CPU environment and put the finder first on ``sys.meta_path`` (idempotent)."""
    os.environ.update(CPU_ENVIRONMENT)
    if not any(isinstance(f, StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, StandInFinder())
