"""The fused `moe_ffn` op: routed expert FFNs and the weighted combine of a Mixture-of-Experts block.

Given tokens x [T, D] and the router's outputs (weights [T, k], expert ids int32 [T, k]),
`out[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])`, with GShard/Switch token dropping when
params.capacity is set (see `MoeParams` for the exact semantics). The shared expert is not part of
the op. `moe_ffn` is a `jax.custom_vjp`: the forward runs the chosen implementation; the backward
is the routed backward of `xla.backward` for impl="xla" and the VJP of the pure-jnp reference
(`reference.moe_ffn_reference`, which defines the op) for impl="reference". Gradients flow to x,
weights and every expert weight and bias; ids carry none.

Example, Qwen3-MoE-style SwiGLU experts (top-2 of 8)::

    import jax, jax.numpy as jnp
    from moefuse.kernels.moe import MoeParams, moe_ffn

    T, D, F, E = 16, 64, 128, 8
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, D))
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (T, E))), 2)
    w_gate, w_up = (jax.random.normal(kk, (E, D, F)) * D**-0.5 for kk in keys[2:4])
    w_down = jax.random.normal(keys[4], (E, F, D)) * F**-0.5
    p = MoeParams(num_experts=E, k=2, activation="swiglu")
    out = moe_ffn(x, weights, ids, (w_gate, w_up), w_down, p)   # [16, 64] float32
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from . import xla
from .params import MoeParams
from .reference import (
    ExpertWeights,
    expert_weights,
    moe_ffn_reference,
    routed_ffn_reference,
    validate_inputs,
)
from .xla import routed_ffn_xla, schedule

__all__ = ["IMPLS", "MoeParams", "moe_ffn", "moe_ffn_reference", "schedule"]

IMPLS = {"reference": routed_ffn_reference, "xla": routed_ffn_xla}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _moe(params: MoeParams, impl: str, x, weights, ids, ew: ExpertWeights):
    return IMPLS[impl](x, weights, ids, ew, params)


def _moe_fwd(params: MoeParams, impl: str, x, weights, ids, ew: ExpertWeights):
    if impl == "xla":
        return xla.forward(x, weights, ids, ew, params)
    return routed_ffn_reference(x, weights, ids, ew, params), (x, weights, ids, ew)


def _moe_bwd(params: MoeParams, impl: str, residuals, g):
    if impl == "xla":
        dx, dweights, dew = xla.backward(residuals, g, params)
        return dx, dweights, None, dew
    x, weights, ids, ew = residuals
    _, pullback = jax.vjp(lambda x_, w_, ew_: routed_ffn_reference(x_, w_, ids, ew_, params), x, weights, ew)
    dx, dweights, dew = pullback(g)
    return dx, dweights, None, dew


_moe.defvjp(_moe_fwd, _moe_bwd)


def moe_ffn(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    w_in: jax.Array | tuple[jax.Array, jax.Array],
    w_down: jax.Array,
    params: MoeParams,
    *,
    b_in: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    b_down: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Routed expert FFNs combined over k: out [T, D] in x's dtype.

    x [T, D]; weights [T, k] (floating); ids [T, k] int32. w_in is [E, D, F] for plain MLPs
    (gelu/relu/silu); for GLU activations the pair (w_gate, w_up) of [E, D, F], or one [E, D, 2F]
    array when params.fused_gate_up (layout params.gate_up_layout). w_down is [E, F, D].
    b_in ([E, F], a pair, or [E, 2F], following w_in) and b_down [E, D] are required iff
    params.has_expert_bias. `impl` is one of IMPLS ("reference", "xla").
    Raises TypeError / ValueError for inputs that do not fit params.
    """
    if impl not in IMPLS:
        raise ValueError(f"moe_ffn: unknown impl {impl!r}; valid: {sorted(IMPLS)}")
    if not isinstance(params, MoeParams):
        raise TypeError(f"moe_ffn: params must be a MoeParams, got {type(params).__name__}")

    def arr(a: Any) -> Any:
        if a is None:
            return None
        return tuple(jnp.asarray(v) for v in a) if isinstance(a, tuple | list) else jnp.asarray(a)

    if hasattr(ids, "dtype") and jnp.dtype(ids.dtype) != jnp.int32:  # before asarray can narrow int64
        raise TypeError(f"moe_ffn: ids must be int32, got {ids.dtype}")
    x, weights, ids, w_down, b_down = (arr(a) for a in (x, weights, ids, w_down, b_down))
    ew = expert_weights(arr(w_in), w_down, arr(b_in), b_down, params)
    validate_inputs(x, weights, ids, ew, params)
    return _moe(params, impl, x, weights, ids, ew)
