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

from .pallas_common import route_pallas
from .params import RouteParams

MAX_K = 32  # the kernel unrolls one pass over the experts per chosen expert
MAX_GROUPS = 64  # ... and per group for group-limited selection
BLOCK_ELEMENTS = 1 << 17  # block_tokens * E per step: [bt, E] f32 temporaries stay well inside VMEM


def _lanes(shape: tuple[int, int]) -> jax.Array:
    return lax.broadcasted_iota(jax.numpy.int32, shape, 1)  # Mosaic wants 2-D iotas


def default_block_tokens(num_experts: int) -> int:
    """Tokens per grid step: a power of two (>= 16, a bf16 sublane tile) with bt * E <= 2^17."""
    bt = 512
    while bt > 16 and bt * num_experts > BLOCK_ELEMENTS:
        bt //= 2
    return bt


def unsupported(params: RouteParams, dtype: str) -> str | None:
    """Why this kernel does not take these params (the reason shown in the Plan), or None."""
    if dtype not in ("float32", "bfloat16"):
        return f"dtype {dtype}: the kernel is built for float32 and bfloat16"
    if params.k > MAX_K:
        return f"k={params.k} > {MAX_K}: the kernel unrolls one pass per chosen expert"
    if params.n_group > MAX_GROUPS:
        return f"n_group={params.n_group} > {MAX_GROUPS}"
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
    return route_pallas(
        logits,
        params,
        bias,
        expert_scale,
        lanes=_lanes,
        token_block=lambda t: t if t <= bt else bt,  # a block is a multiple of 16 rows or all of them
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )
