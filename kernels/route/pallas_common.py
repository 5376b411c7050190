"""What the TPU and GPU route kernels share: their limits, token blocks, one pallas_call.

Each backend module gives the lane-index helper its lowering accepts, its compiler parameters, its
token block and whether the block's 16-bit float ops are computed in float32 (`f32_ops`);
`route_pallas` does the rest::

    out = route_pallas(logits, params, bias, scale, lanes=..., token_block=lambda t: min(t, 256),
                       compiler_params=..., compute_in_f32=False, interpret=False)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .block import Lanes, route_block
from .f32_ops import float32_ops
from .params import RouteParams
from .reference import route_reference, validate_inputs

MAX_K = 32  # the kernels unroll one pass over the experts per chosen expert
MAX_GROUPS = 64  # ... and per group for group-limited selection


def unsupported(params: RouteParams) -> str | None:
    """Why neither kernel takes these params (the reason shown in the Plan), or None."""
    if params.k > MAX_K:
        return f"k={params.k} > {MAX_K}: the kernel unrolls one pass per chosen expert"
    if params.n_group > MAX_GROUPS:
        return f"n_group={params.n_group} > {MAX_GROUPS}"
    return None


def block_tokens(num_experts: int, largest: int, smallest: int, max_elements: int) -> int:
    """The largest power of two from `largest` down to `smallest` with block * E <= max_elements
    (`smallest` when none is)."""
    bt = largest
    while bt > smallest and bt * num_experts > max_elements:
        bt //= 2
    return bt


def _kernel(params: RouteParams, lanes: Lanes, compute_in_f32: bool, has_bias: bool, has_scale: bool,
            *refs: Any) -> None:
    refs = list(refs)
    logits = refs.pop(0)[...]
    bias = refs.pop(0)[...] if has_bias else None
    scale = refs.pop(0)[...] if has_scale else None
    block = lambda x, b, s: route_block(x, b, s, params, lanes)
    w, ids, s = (float32_ops(block) if compute_in_f32 else block)(logits, bias, scale)
    refs[0][...] = w.astype(refs[0].dtype)
    refs[1][...] = ids
    if s is not None:
        refs[2][...] = s.astype(refs[2].dtype)


def route_pallas(
    logits: jax.Array,
    params: RouteParams,
    bias: jax.Array | None,
    expert_scale: jax.Array | None,
    *,
    lanes: Lanes,
    token_block: Callable[[int], int],
    compiler_params: Any,
    compute_in_f32: bool,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """`route_reference`'s contract, as one pallas_call over blocks of token_block(T) tokens; with
    compute_in_f32, the block's 16-bit float ops are computed in float32 (`f32_ops.float32_ops`)."""
    validate_inputs(logits, params, bias, expert_scale)
    want = jax.eval_shape(lambda x, b, s: route_reference(x, params, b, s), logits, bias, expert_scale)
    lead, e = logits.shape[:-1], params.num_experts
    t = math.prod(lead)
    bt = token_block(t)
    rows = lambda n: pl.BlockSpec((bt, n), lambda i: (i, 0))  # noqa: E731
    whole = pl.BlockSpec((1, e), lambda i: (0, 0))
    inputs = [logits.reshape(t, e)] + [v.reshape(1, e) for v in (bias, expert_scale) if v is not None]
    out_shape = [
        jax.ShapeDtypeStruct((t, params.k), want[0].dtype),
        jax.ShapeDtypeStruct((t, params.k), jnp.int32),
    ]
    out_specs = [rows(params.k), rows(params.k)]
    if params.expose_scores:
        out_shape.append(jax.ShapeDtypeStruct((t, e), want[2].dtype))
        out_specs.append(rows(e))
    out = pl.pallas_call(
        functools.partial(_kernel, params, lanes, compute_in_f32, bias is not None, expert_scale is not None),
        grid=(pl.cdiv(t, bt),),
        in_specs=[rows(e)] + [whole] * (len(inputs) - 1),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=interpret,
    )(*inputs)
    return tuple(o.reshape(*lead, o.shape[-1]) for o in out)
