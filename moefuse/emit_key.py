"""A structural key of a fused op's emit function: sites whose emits compute the same function of their
inputs share one type check (`rewrite._type_problem`), so a model's identical layers build it once.

Two emits get the same key when they run the same code (the same code objects, over the same module
globals) on closures that are equal up to a renaming of jaxpr variables: a variable is keyed by the
order in which it first appears and by its type, so which values are the same variable is kept. An
object the key cannot describe (anything but plain data, dtypes, numpy arrays, tuples, lists, dicts,
frozen dataclasses, functions and jaxpr atoms) gives None, and that site is checked on its own::

    key = emit_key(proposal.emit)      # hashable, or None
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import numpy as np

from moefuse import _compat as C

_PLAIN = (type(None), bool, int, float, complex, str, bytes, type, np.dtype)


class _Opaque(Exception):
    """An object the key cannot describe."""


def emit_key(emit: Any) -> Any:
    """A hashable key of `emit` (see the module docstring), or None when it cannot be built."""
    try:
        key = _key(emit, {}, 0)
        hash(key)
    except (_Opaque, TypeError, RecursionError):
        return None
    return key


def _key(obj: Any, names: dict[int, int], depth: int) -> Any:
    if depth > 40:
        raise _Opaque("too deep")
    if isinstance(obj, _PLAIN) or obj is Ellipsis:
        return type(obj).__name__, obj
    if isinstance(obj, C.Var):
        return "var", names.setdefault(id(obj), len(names)), obj.aval
    if C.is_literal(obj):
        val = np.asarray(obj.val)
        return "literal", str(val.dtype), val.shape, val.tobytes()
    if isinstance(obj, np.ndarray):
        return "array", str(obj.dtype), obj.shape, obj.tobytes()
    if isinstance(obj, (tuple, list)):
        return type(obj).__name__, tuple(_key(v, names, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return "dict", tuple((_key(k, names, depth + 1), _key(v, names, depth + 1)) for k, v in obj.items())
    if isinstance(obj, types.FunctionType):
        cells = tuple(_key(c.cell_contents, names, depth + 1) for c in obj.__closure__ or ())
        defaults = _key((obj.__defaults__, obj.__kwdefaults__), names, depth + 1)
        return "function", obj.__code__, id(obj.__globals__), cells, defaults
    if isinstance(obj, functools.partial):
        return "partial", _key((obj.func, obj.args, obj.keywords), names, depth + 1)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and obj.__dataclass_params__.frozen:
        fields = tuple(_key(getattr(obj, f.name), names, depth + 1) for f in dataclasses.fields(obj))
        return "dataclass", type(obj), fields
    if hasattr(obj, "dtype") and hasattr(obj, "itemsize") and not hasattr(obj, "shape"):
        return "dtype", str(obj)  # a numpy scalar type such as jnp.float32
    raise _Opaque(type(obj).__name__)
