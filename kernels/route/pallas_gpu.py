"""Pallas GPU (Triton) kernel of the fused `route` op: one program per block of tokens.

The same per-block computation as the TPU kernel (`block.route_block`); Triton wants every block
dimension a power of two, so the token block is one (the last block is masked) and E and k must be
powers of two (other shapes decline to XLA, with that reason in the Plan).

Example (numerics on any host with interpret=True)::

    import jax.numpy as jnp
    from moefuse.kernels.route.params import RouteParams
    from moefuse.kernels.route.pallas_gpu import route_pallas_gpu

    p = RouteParams(num_experts=16, k=2, post=(("renorm", 0.0),))
    w, ids = route_pallas_gpu(jnp.zeros((8, 16)), p, interpret=True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from . import pallas_common
from .params import RouteParams

# block_tokens * E per program, for the registers of 4 warps: the Ling router (E=256, k=8, 8 groups)
# uses 196-210 of 255 registers at 8 tokens and spills at 16 (ptxas -v for sm_90a; compile 3 s vs 11 s)
BLOCK_ELEMENTS = 1 << 11


def _lanes(shape: tuple[int, int]) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32)[None, :], shape)  # Triton: 1-D iotas


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_block_tokens(num_experts: int) -> int:
    """Tokens per program: a power of two (1 ... 64) with bt * E <= 2^11."""
    return pallas_common.block_tokens(num_experts, 64, 1, BLOCK_ELEMENTS)


def unsupported(params: RouteParams) -> str | None:
    """Why this kernel does not take these params (the reason shown in the Plan), or None."""
    if reason := pallas_common.unsupported(params):
        return reason
    if not _pow2(params.num_experts):
        return f"num_experts={params.num_experts} is not a power of two (Triton block shapes)"
    if not _pow2(params.k):
        return f"k={params.k} is not a power of two (Triton block shapes)"
    if params.num_experts > 4096:
        return f"num_experts={params.num_experts} > 4096: one row of logits per program would spill"
    return None


def route_pallas_gpu(
    logits: jax.Array,
    params: RouteParams,
    bias: jax.Array | None = None,
    expert_scale: jax.Array | None = None,
    *,
    block_tokens: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Same contract as `route_reference`; block_tokens defaults to `default_block_tokens(E)`."""
    bt = block_tokens or default_block_tokens(params.num_experts)

    def token_block(t: int) -> int:  # the smallest power of two >= t, at most bt
        return min(bt, 1 << max(t - 1, 0).bit_length())

    return pallas_common.route_pallas(
        logits,
        params,
        bias,
        expert_scale,
        lanes=_lanes,
        token_block=token_block,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        compute_in_f32=True,  # Triton has no bf16 division (sigmoid, softmax, renorm)
        interpret=interpret,
    )
