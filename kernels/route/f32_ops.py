"""Evaluate a function with each operation on 16-bit floats computed in float32 and rounded back.

Triton (the Pallas GPU backend) has no bfloat16 division, and lowers `logistic` as
`1 / (1 + exp(-x))` in the operand's dtype, so a bf16 sigmoid, softmax or renormalisation does not
lower. `float32_ops(fn)` evaluates fn's jaxpr with every equation that reads or writes a 16-bit
float reading its operands as float32 and rounding each result to the dtype the equation had
(`logistic` expanded to `1 / (1 + exp(-x))` first, as XLA and Triton expand it). That is the value
of each 16-bit op in its own dtype, as XLA computes it: it too computes such an op in float32 and
rounds (for +, -, *, / that is the correctly rounded result). XLA may also keep an intermediate in
float32 where it fuses ops (`xla_allow_excess_precision`, on by default; XLA:GPU's bf16 softmax
rounds each op, XLA:CPU's keeps exp in float32): then its values can differ by an ulp.

Example (inside a GPU kernel body)::

    w = float32_ops(lambda x: jax.nn.softmax(x, axis=-1))(logits)   # bf16 in, bf16 out
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core
from jax.extend.core import primitives as prims


def _is_16bit_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _sigmoid(x: jax.Array) -> jax.Array:
    return 1 / (1 + jnp.exp(-x))  # logistic as XLA and Triton expand it


def _apply(eqn: core.JaxprEqn, args: Sequence[Any]) -> list[Any]:
    """The outputs of one equation, its 16-bit float ops computed in float32 and rounded."""
    if eqn.primitive is prims.jit_p:  # a nested jit (jnp.where, ...): its equations one by one
        closed = eqn.params["jaxpr"]
        return _eval(closed.jaxpr, closed.consts, args)
    in_dtypes = [v.aval.dtype for v in eqn.invars]
    if not any(map(_is_16bit_float, in_dtypes + [v.aval.dtype for v in eqn.outvars])):
        out = eqn.primitive.bind(*args, **eqn.params)
    elif any(core.jaxprs_in_params(eqn.params)) or eqn.primitive is prims.bitcast_convert_type_p:
        raise NotImplementedError(f"float32_ops: {eqn.primitive} of 16-bit floats")
    elif eqn.primitive is prims.logistic_p:
        out = float32_ops(_sigmoid)(*args)
    else:
        wide = [jnp.asarray(a, jnp.float32) if _is_16bit_float(d) else a for a, d in zip(args, in_dtypes)]
        out = eqn.primitive.bind(*wide, **eqn.params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [jnp.asarray(o).astype(v.aval.dtype) for o, v in zip(outs, eqn.outvars)]


def _eval(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[core.Var, Any] = {**dict(zip(jaxpr.constvars, consts)), **dict(zip(jaxpr.invars, args))}
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, _apply(eqn, [read(v) for v in eqn.invars])))
    return [read(v) for v in jaxpr.outvars]


def float32_ops(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn (array arguments and results, pytrees allowed) with each operation on 16-bit floats done in
    float32 and its result rounded to the operation's dtype; other operations as written."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return run
