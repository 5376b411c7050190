"""MoE blocks whose activations carry unit batch dims (batch 1, `[1, T, D]`), as `MoECase`s.

Written the way a port of PyTorch code runs at batch size 1: every matmul squeezes `[1, T, ...]`
operands to 2-D and expands its result back (`jnp.squeeze(a[None], 0) @ w`, then `y[None]`), the
activation runs on the expanded values, and the loop over experts combines in `[1, T, D]` layout
with ids and weights reshaped to `[1, T, k]` (EasyDeL's DBRX expert loop)::

    case = make_loop_batch1_squeezed_dbrx()
    y = jax.jit(case.fn)(*case.args)       # [1, T, D]

`UNIT_DIM_MOE_BLOCKS` are MoE blocks (`MoECase`, with `ref` for the per-token reference of
`moe_blocks.py`); `UNIT_DIM_NEAR_MISSES` look like them but are not (family "near-miss").
`tests/patterns/test_moe_unit_dims.py` runs the reference and the fusion checks on both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import NEAR_MISS, ZooCase, normal
from .moe_blocks import MOE, MoECase, _block_ref, _ffn_ref, _ref, _router_ref, _w, moe_expect


def _squeezed_matmul(a, w):
    """`a [1, T, n] @ w [n, m]` spelled with a unit dim added to w and both squeezed before the dot."""
    return (jnp.squeeze(a, 0) @ jnp.squeeze(w[None], 0))[None]


def make_loop_batch1_squeezed_dbrx() -> MoECase:
    """DBRX-style loop over experts at batch 1: w1/v1/w2 stored flat [E*F, D], FFN in [1, T, F]."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 48, 8, 2
    x = normal(1900, (1, num_tokens, d_model))
    router_w = _w(1901, (d_model, num_experts), d_model)
    w1 = _w(1902, (num_experts * d_ff, d_model), d_model)
    v1 = _w(1903, (num_experts * d_ff, d_model), d_model)
    w2 = _w(1904, (num_experts * d_ff, d_model), d_ff)

    def block(x, router_w, w1, v1, w2):
        logits = x.reshape(-1, d_model) @ router_w
        weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        weights, ids = weights.reshape(1, num_tokens, top_k), ids.reshape(1, num_tokens, top_k)
        out = jnp.zeros_like(x)
        for e in range(num_experts):
            gate = _squeezed_matmul(x, w1.reshape(num_experts, d_ff, d_model)[e].T)
            up = _squeezed_matmul(x, v1.reshape(num_experts, d_ff, d_model)[e].T)
            down = _squeezed_matmul(jax.nn.silu(gate) * up, w2.reshape(num_experts, d_ff, d_model)[e])
            out = out + jnp.sum((ids == e) * weights, axis=-1)[:, :, None] * down
        return out, logits

    def per_expert(w):
        return w.reshape(num_experts, d_ff, d_model)

    router = _router_ref(router_w, top_k, renorm=True)
    ffn = _ffn_ref(
        "swiglu", jnp.swapaxes(per_expert(v1), 1, 2), per_expert(w2), jnp.swapaxes(per_expert(w1), 1, 2)
    )
    return MoECase(
        "loop_batch1_squeezed_dbrx",
        block,
        (x, router_w, w1, v1, w2),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "loop"),
        note="batch-1 [1, T, D] tokens; every matmul squeezes its operands and expands its result; "
        "combine sum((ids == e) * w, -1)[:, :, None] * out in [1, T, D]; returns (out, logits)",
        ref=_ref(x, [_block_ref(router, ffn)]),
    )


def make_loop_batch1_reshaped_relu() -> MoECase:
    """Loop over experts at batch 1 with `reshape` to 2-D around each matmul, relu written inline."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 4, 2
    x = normal(1910, (1, num_tokens, d_model))
    router_w = _w(1911, (d_model, num_experts), d_model)
    w_up = _w(1912, (num_experts, d_model, d_ff), d_model)
    w_down = _w(1913, (num_experts, d_ff, d_model), d_ff)

    def block(x, router_w, w_up, w_down):
        logits = x.reshape(num_tokens, d_model) @ router_w
        weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
        weights, ids = weights[None], ids[None]  # [1, T, k]
        out = jnp.zeros_like(x)
        for e in range(num_experts):
            h = (x.reshape(num_tokens, d_model) @ w_up[e]).reshape(1, num_tokens, d_ff)
            h = jnp.maximum(h, 0.0)
            y = (h.reshape(num_tokens, d_ff) @ w_down[e]).reshape(1, num_tokens, d_model)
            out = out + jnp.sum(weights * (ids == e), -1)[..., None] * y
        return out

    router = _router_ref(router_w, top_k)
    return MoECase(
        "loop_batch1_reshaped_relu",
        block,
        (x, router_w, w_up, w_down),
        MOE,
        moe_expect(top_k, num_experts, "relu", "loop"),
        note="batch-1 [1, T, D] tokens reshaped to [T, D] before each matmul and back after it; relu as "
        "jnp.maximum on [1, T, F]; combine sum(w * (ids == e), -1)[..., None] * y; no nested jit",
        ref=_ref(x, [_block_ref(router, _ffn_ref("relu", w_up, w_down))]),
    )


def make_nm_loop_outer_product_rows() -> ZooCase:
    """A loop whose combine multiplies every token's weight with every token's FFN output."""
    num_tokens, d_model, d_ff, num_experts, top_k = 8, 16, 32, 4, 2
    x = normal(1920, (num_tokens, d_model))
    router_w = _w(1921, (d_model, num_experts), d_model)
    w_gate = _w(1922, (num_experts, d_model, d_ff), d_model)
    w_up = _w(1923, (num_experts, d_model, d_ff), d_model)
    w_down = _w(1924, (num_experts, d_ff, d_model), d_ff)

    def block(x, router_w, w_gate, w_up, w_down):
        weights, ids = jax.lax.top_k(jax.nn.softmax(x @ router_w, axis=-1), top_k)
        out = jnp.zeros((num_tokens, num_tokens, d_model))
        for e in range(num_experts):
            y = (jax.nn.silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]
            weight = jnp.sum(jnp.where(ids == e, weights, 0.0), axis=-1)
            out = out + weight[None, :, None] * y[:, None, :]  # out[s, t] = w_e[t] * FFN_e(x[s])
        return out

    return ZooCase(
        "nm_loop_outer_product_rows",
        block,
        (x, router_w, w_gate, w_up, w_down),
        NEAR_MISS,
        {},
        count=0,
        note="out[s, t] = sum_e w_e[t] * FFN_e(x[s]): weights and expert outputs on different token axes",
    )


UNIT_DIM_MOE_BLOCKS = [make_loop_batch1_squeezed_dbrx, make_loop_batch1_reshaped_relu]
UNIT_DIM_NEAR_MISSES = [make_nm_loop_outer_product_rows]
