"""Pallas TPU (Mosaic) kernel of the fused `route` op: one grid step per block of tokens.

Each step reads a [block_tokens, E] block of logits (the whole expert axis in lanes) and writes the
[block_tokens, k] weights and ids (and the scores when exposed); see `block.route_block` for how
selection is done in the kernel. Blocks are independent ("parallel", so v7x's two cores split them).

Example (numerics on any host with interpret=True)::

    import jax.numpy as jnp
    from moefuse.kernels.route.params import RouteParams
    from moefuse.kernels.route.pallas_tpu import route_pallas_tpu

    p = RouteParams(num_experts=16, k=2, post=(("renorm", 0.0),))
    w, ids = route_pallas_tpu(jnp.zeros((8, 16)), p, interpret=True)
"""

from __future__ import annotations

import jax
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from . import pallas_common
from .params import RouteParams

BLOCK_ELEMENTS = 1 << 17  # block_tokens * E per step: [bt, E] f32 temporaries stay well inside VMEM


def _lanes(shape: tuple[int, int]) -> jax.Array:
    return lax.broadcasted_iota(jax.numpy.int32, shape, 1)  # Mosaic wants 2-D iotas


def default_block_tokens(num_experts: int) -> int:
    """Tokens per grid step: a power of two (16 ... 512; 16 is a bf16 sublane tile) with bt * E <= 2^17."""
    return pallas_common.block_tokens(num_experts, 512, 16, BLOCK_ELEMENTS)


def unsupported(params: RouteParams) -> str | None:
    """Why this kernel does not take these params (the reason shown in the Plan), or None."""
    if reason := pallas_common.unsupported(params):
        return reason
    if params.num_experts * 16 > BLOCK_ELEMENTS * 4:
        return f"num_experts={params.num_experts}: a block of 16 tokens would not fit VMEM comfortably"
    return None


def route_pallas_tpu(
    logits: jax.Array,
    params: RouteParams,
    bias: jax.Array | None = None,
    expert_scale: jax.Array | None = None,
    *,
    block_tokens: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Same contract as `route_reference`; block_tokens defaults to `default_block_tokens(E)`."""
    bt = block_tokens or default_block_tokens(params.num_experts)
    return pallas_common.route_pallas(
        logits,
        params,
        bias,
        expert_scale,
        lanes=_lanes,
        token_block=lambda t: t if t <= bt else bt,  # a block is a multiple of 16 rows or all of them
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        compute_in_f32=False,  # Mosaic lowers bf16 arithmetic
        interpret=interpret,
    )
