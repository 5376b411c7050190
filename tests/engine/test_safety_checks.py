"""The engine's safety checks, each on its own, with a test-only pattern.

A stand-in pattern anchors on `tanh` and proposes to replace `y = tanh(...)` with whatever inputs
and outputs a test gives it. Each test builds a program where that rewrite would change meaning
unless one particular check (escape, foreign read, effects, a body inside, convexity, output
types) stops it, and asserts that check's reason. Switching any check off makes its test fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

import moefuse
import moefuse.patterns
from moefuse import select
from moefuse.match import NoMatch, Proposal
from moefuse.view import View

X = jnp.linspace(-1.0, 1.0, 8)


@dataclasses.dataclass
class TanhPattern:
    """Proposes `tanh` regions: pick(view, anchor) -> (inputs, outputs); emit(*inputs) -> outputs."""

    pick: Callable[[View, int], tuple[list[Any], list[Any]]]
    emit_fn: Callable[..., list[Any]]
    op: str = "tanh_op"

    def anchors(self, view: View) -> list[int]:
        return [i for i, e in enumerate(view.jaxpr.eqns) if e.primitive.name == "tanh"]

    def match(self, view: View, anchor: int) -> Proposal | NoMatch:
        inputs, outputs = self.pick(view, anchor)
        return Proposal(self.op, anchor, inputs, outputs, {}, emit=lambda kernel, *a: self.emit_fn(*a))


def _use(monkeypatch, pick, emit_fn) -> None:
    monkeypatch.setattr(moefuse.patterns, "PATTERNS", (TanhPattern(pick, emit_fn),))
    monkeypatch.setattr(select, "choose", lambda request, target: select.Choice(select.Kernel("xla")))


def _program_input(view: View, anchor: int) -> Any:
    return view.jaxpr.invars[0]


def _declined_because(fn, *args, reason: str) -> None:
    plan = moefuse.plan(fn, *args)
    assert plan.fused == [], str(plan)
    assert reason in plan.declined[0].reason, plan.declined[0].reason
    for g, e in zip(jax.tree.leaves(moefuse.jit(fn)(*args)), jax.tree.leaves(jax.jit(fn)(*args))):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_the_stand_in_pattern_fuses_a_clean_region(monkeypatch):
    _use(
        monkeypatch,
        lambda v, a: ([v.jaxpr.invars[0]], [v.jaxpr.eqns[a].outvars[0]]),
        lambda x: [jnp.tanh(x * 2)],
    )
    fn = lambda x: jnp.tanh(x * 2) + 1
    assert [s.op for s in moefuse.plan(fn, X).fused] == ["tanh_op"]
    np.testing.assert_allclose(moefuse.jit(fn)(X), fn(X), rtol=1e-6)


def test_escape(monkeypatch):
    _use(
        monkeypatch,
        lambda v, a: ([v.jaxpr.invars[0]], [v.jaxpr.eqns[a].outvars[0]]),
        lambda x: [jnp.tanh(x * 2)],
    )

    def fn(x):
        h = x * 2
        return jnp.tanh(h), h + 1  # h is interior to the region and used outside

    _declined_because(fn, X, reason="is also used outside")


def test_foreign_read(monkeypatch):
    _use(
        monkeypatch, lambda v, a: ([v.jaxpr.invars[0]], [v.jaxpr.eqns[a].outvars[0]]), lambda x: [jnp.tanh(x)]
    )
    _declined_because(lambda x, z: jnp.tanh(x * z), X, X + 3, reason="also reads")


def test_effects(monkeypatch):
    _use(
        monkeypatch, lambda v, a: ([v.jaxpr.invars[0]], [v.jaxpr.eqns[a].outvars[0]]), lambda x: [jnp.tanh(x)]
    )

    def fn(x):
        h = io_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x, ordered=True)
        return jnp.tanh(h)

    plan = moefuse.plan(fn, X)
    assert plan.fused == [] and "side effects" in plan.declined[0].reason, str(plan)


def test_body_inside_the_region(monkeypatch):
    _use(
        monkeypatch, lambda v, a: ([v.jaxpr.invars[0]], [v.jaxpr.eqns[a].outvars[0]]), lambda x: [jnp.tanh(x)]
    )

    def fn(x):
        h = jax.lax.fori_loop(0, 3, lambda i, c: c * 1.5, x)
        return jnp.tanh(h)

    _declined_because(fn, X, reason="with a body inside the region")


def test_convexity(monkeypatch):
    """inputs (x, g), outputs (y, h): but g = sin(h) is computed outside from the output h."""

    def pick(view, anchor):
        add = view.producer(view.jaxpr.eqns[anchor].invars[0])
        h, g = add.invars
        return [view.jaxpr.invars[0], g], [view.jaxpr.eqns[anchor].outvars[0], h]

    _use(monkeypatch, pick, lambda x, g: [jnp.tanh(x * 2 + g), x * 2])

    def fn(x):
        h = x * 2
        g = jnp.sin(h)
        return jnp.tanh(h + g), h

    _declined_because(fn, X, reason="feed back into its own inputs")


def test_output_types(monkeypatch):
    _use(
        monkeypatch,
        lambda v, a: ([v.jaxpr.invars[0]], [v.jaxpr.eqns[a].outvars[0]]),
        lambda x: [jnp.tanh(x).astype(jnp.bfloat16)],
    )
    _declined_because(lambda x: jnp.tanh(x), X, reason="fused op would give bfloat16")


def test_a_recomputed_input_is_read_as_that_input(monkeypatch):
    """The region reads x * 2 computed twice: value numbering makes the second the first."""

    def pick(view, anchor):
        return [view.jaxpr.eqns[0].outvars[0]], [view.jaxpr.eqns[anchor].outvars[0]]

    _use(monkeypatch, pick, lambda h: [jnp.tanh(h)])

    def fn(x):
        h1 = x * 2
        h2 = x * 2  # the same value, computed again
        return jnp.tanh(h2), h1

    assert [s.op for s in moefuse.plan(fn, X).fused] == ["tanh_op"]
    for g, e in zip(moefuse.jit(fn)(X), fn(X)):
        np.testing.assert_allclose(g, e, rtol=1e-6)


def test_dead_code_is_not_an_outside_use(monkeypatch):
    """`jnp.sign(h)` computed and dropped reads h, but reaches no output: not an escape."""
    _use(
        monkeypatch,
        lambda v, a: ([v.jaxpr.invars[0]], [v.jaxpr.eqns[a].outvars[0]]),
        lambda x: [jnp.tanh(x * 2)],
    )

    def fn(x):
        h = x * 2
        jnp.sign(h)  # dead
        return jnp.tanh(h)

    assert [s.op for s in moefuse.plan(fn, X).fused] == ["tanh_op"]
    np.testing.assert_allclose(moefuse.jit(fn)(X), fn(X), rtol=1e-6)
