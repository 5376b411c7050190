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

from .pallas_common import route_pallas
from .params import RouteParams

MAX_K = 32  # the kernel unrolls one pass over the experts per chosen expert
MAX_GROUPS = 64
BLOCK_ELEMENTS = 1 << 13  # block_tokens * E per program: registers of 4 warps, no spills at E=256


def _lanes(shape: tuple[int, int]) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32)[None, :], shape)  # Triton: 1-D iotas


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_block_tokens(num_experts: int) -> int:
    """Tokens per program: a power of two (>= 1) with bt * E <= 2^13."""
    bt = 64
    while bt > 1 and bt * num_experts > BLOCK_ELEMENTS:
        bt //= 2
    return bt


def unsupported(params: RouteParams, dtype: str) -> str | None:
    """Why this kernel does not take these params (the reason shown in the Plan), or None."""
    if dtype not in ("float32", "bfloat16"):
        return f"dtype {dtype}: the kernel is built for float32 and bfloat16"
    if not _pow2(params.num_experts):
        return f"num_experts={params.num_experts} is not a power of two (Triton block shapes)"
    if not _pow2(params.k):
        return f"k={params.k} is not a power of two (Triton block shapes)"
    if params.k > MAX_K:
        return f"k={params.k} > {MAX_K}: the kernel unrolls one pass per chosen expert"
    if params.n_group > MAX_GROUPS:
        return f"n_group={params.n_group} > {MAX_GROUPS}"
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

    return route_pallas(
        logits,
        params,
        bias,
        expert_scale,
        lanes=_lanes,
        token_block=token_block,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )
