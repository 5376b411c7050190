"""The retrace's unit-dims rule (`moefuse.rewrite.inline_jits`): removing unit dims (a `squeeze`,
or a reshape that only drops size-1 dims) from an elementwise op of unit-expanded operands reads as
the elementwise op of the unexpanded operands, with the same values bit for bit::

    closed = inline_jits(jax.make_jaxpr(lambda a, b: jnp.squeeze(jax.nn.silu(a[None]) * b[None], 0))(a, b))
    # closed computes mul(a * logistic(a), b) on [T, D]: no squeeze, no broadcast
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from moefuse.rewrite import inline_jits
from moefuse.view import View

RNG = np.random.default_rng(0)
A = jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)
B = jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)
W = jnp.asarray(RNG.normal(size=(6,)), jnp.float32)


def _retraced(fn, *args):
    """(the retraced ClosedJaxpr, its View) of fn at args."""
    closed = inline_jits(jax.make_jaxpr(fn)(*args))
    return closed, View(closed)


def _silu_gate(a, b):
    return jnp.squeeze(jax.nn.silu(a[None]) * b[None], 0)


def test_a_squeeze_of_an_elementwise_op_of_expanded_operands_is_the_op_of_the_operands():
    closed, view = _retraced(_silu_gate, A, B)
    (out,) = closed.jaxpr.outvars
    a, b = closed.jaxpr.invars
    assert view.op(out) == "mul" and out.aval.shape == A.shape
    silu, up = view.args(out)
    assert up is b and view.op(silu) == "mul" and a in view.args(silu)
    live = [closed.jaxpr.eqns[i] for i in sorted(view.live)]
    assert all(len(v.aval.shape) == 2 for e in live for v in [*e.invars, *e.outvars])


def test_a_squeeze_of_an_expansion_is_the_value_itself():
    closed, view = _retraced(lambda a: jnp.squeeze(a[None], 0) + jnp.squeeze(a[:, None, :], 1), A)
    (a,) = closed.jaxpr.invars
    assert view.args(closed.jaxpr.outvars[0]) == [a, a]


def test_a_reshape_dropping_unit_dims_reads_through_broadcasts_of_several_layouts():
    """w [T] as [1, T, 1] times y [T, D] as [1, T, D] (implicit size-1 broadcasting), then reshaped."""

    def fn(w, y):
        return (w[None, :, None] * jnp.exp(y.reshape(1, 6, 5))).reshape(6, 5)

    closed, view = _retraced(fn, W, A)
    w, y = closed.jaxpr.invars
    (out,) = closed.jaxpr.outvars
    assert view.op(out) == "mul"
    col, e = view.args(out)
    assert view.op(e) == "exp" and view.args(e) == [y]
    assert view.op(col) == "broadcast_in_dim" and view.args(col) == [w] and col.aval.shape == (6, 1)


def test_a_squeeze_of_a_value_that_is_not_an_expansion_stays_as_written():
    """No new squeeze of another value is made: exp(x) of an input [1, T, D] keeps its squeeze."""
    closed, view = _retraced(lambda x, b: jnp.squeeze(jnp.exp(x) * b[None], 0), A[None], B)
    assert view.op(closed.jaxpr.outvars[0]) == "squeeze"


def test_a_reshape_that_moves_a_unit_dim_is_not_read_through():
    closed, view = _retraced(lambda a: jnp.exp(a.reshape(6, 1, 5)).reshape(6, 5, 1), A)
    assert view.op(closed.jaxpr.outvars[0]) == "reshape"


def _programs():
    """Programs the rule rewrites, each with its arguments."""
    i = jnp.asarray(RNG.integers(0, 4, size=(6, 5)), jnp.int32)
    return [
        (_silu_gate, (A, B)),
        (lambda w, y: (w[None, :, None] * jnp.tanh(y[None])).reshape(6, 5), (W, A)),
        (lambda a, i: jnp.squeeze(jnp.where(i[None] == 2, jnp.clip(a[None], -0.5, 0.5), 0.0), 0), (A, i)),
        (lambda a: jnp.squeeze(jnp.zeros((1, 6, 5)) + a[None] / 3.0, 0), (A,)),
        (
            lambda a, i: jnp.squeeze((i[None] // 3 + 1).astype(jnp.float32) * jnp.sqrt(jnp.abs(a))[None], 0),
            (A, i),
        ),
        (lambda a: jnp.squeeze(jax.nn.gelu(a[None, :, None]), (0, 2)), (A,)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_the_retraced_program_gives_the_same_bits(index):
    fn, args = _programs()[index]
    closed = jax.make_jaxpr(fn)(*args)
    retraced = inline_jits(closed)
    removes = ("squeeze", "reshape")
    assert View(closed).op(closed.jaxpr.outvars[0]) in removes
    assert View(retraced).op(retraced.jaxpr.outvars[0]) not in removes  # the rule applied
    want = jax.jit(jax.extend.core.jaxpr_as_fun(closed))(*args)
    got = jax.jit(jax.extend.core.jaxpr_as_fun(retraced))(*args)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
