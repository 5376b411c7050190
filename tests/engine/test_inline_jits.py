"""`rewrite.inline_jits`: nested `jit` bodies spliced into the matching jaxpr, without a retrace.

The result must be a valid jaxpr (every var defined once, before use) computing the same values,
with no `jit` equation left, even when one cached body is inlined in several places, has constants,
returns its input or a literal, or holds another `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moefuse import _compat as C
from moefuse.rewrite import inline_jits

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
TABLE = np.arange(8, dtype=np.float32)  # a constant a jit body closes over


@jax.jit
def scaled(x):
    return jnp.tanh(x) * 3.0


@jax.jit
def with_table(x):
    return x + jnp.asarray(TABLE)


@jax.jit
def passthrough(x):
    return x, 2.0


@jax.jit
def nested(x):
    return scaled(x) + with_table(x)


def ssa_problems(jaxpr: C.Jaxpr) -> list[str]:
    """Vars read before they are defined, or defined twice."""
    defined = set(jaxpr.constvars) | set(jaxpr.invars)
    problems = []
    for eqn in jaxpr.eqns:
        problems += [f"{eqn.primitive} reads {v} undefined" for v in eqn.invars
                     if not C.is_literal(v) and v not in defined]
        for v in eqn.outvars:
            if C.is_dropvar(v):
                continue
            if v in defined:
                problems.append(f"{v} defined twice")
            defined.add(v)
    problems += [f"output {v} undefined" for v in jaxpr.outvars if not C.is_literal(v) and v not in defined]
    return problems


def check(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    flat = inline_jits(closed)
    names = [e.primitive.name for e in flat.jaxpr.eqns]
    assert not set(names) & C.JIT_NAMES, names
    assert ssa_problems(flat.jaxpr) == []
    assert not set(map(id, flat.jaxpr.invars)) & set(map(id, closed.jaxpr.invars))  # new vars
    # both compiled whole (op-by-op tanh and XLA's fused tanh differ by an ulp)
    got = jax.jit(lambda *a: jax.core.eval_jaxpr(flat.jaxpr, flat.consts, *a))(*args)
    want = jax.jit(lambda *a: jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *a))(*args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    return flat


def test_one_body_inlined_twice_gets_its_own_vars_each_time():
    flat = check(lambda x: scaled(x) + scaled(x * 2), X)
    assert [e.primitive.name for e in flat.jaxpr.eqns].count("tanh") == 2


def test_a_body_constant_becomes_a_constant_of_the_result():
    flat = check(lambda x: with_table(x) * with_table(x + 1), X)
    assert any(np.array_equal(np.asarray(c), TABLE) for c in flat.consts)


def test_a_body_returning_its_input_and_a_literal():
    check(lambda x: passthrough(x)[0] * passthrough(x)[1], X)
    check(lambda x: passthrough(x), X)


def test_nested_jits():
    flat = check(lambda x: nested(x) - nested(x + 1.0), X)
    assert [e.primitive.name for e in flat.jaxpr.eqns].count("tanh") == 2


def test_bodies_of_other_primitives_are_left_as_they_are():
    def fn(x):
        return jax.lax.scan(lambda c, r: (c + scaled(r), c), jnp.zeros(8), x)

    closed = jax.make_jaxpr(fn)(X)
    flat = check(fn, X)
    (scan,) = [e for e in flat.jaxpr.eqns if e.primitive.name == "scan"]
    (orig,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    assert scan.params["jaxpr"] is orig.params["jaxpr"]
