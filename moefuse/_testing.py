"""Test hooks for the engine.

`retrace_all()` makes the interpreter rebuild every body (scan, while, cond, remat,
shard_map, custom_jvp/vjp, jit) even when nothing in it matches, so tests exercise the
recursion itself::

    with moefuse._testing.retrace_all():
        out = moefuse.jit(f)(x)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def retracing_all() -> bool:
    return getattr(_state, "retrace_all", False)


@contextlib.contextmanager
def retrace_all() -> Iterator[None]:
    old = retracing_all()
    _state.retrace_all = True
    try:
        yield
    finally:
        _state.retrace_all = old
