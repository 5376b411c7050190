"""A small Ling-2.6-style MoE FFN stack in plain JAX (no moefuse anywhere in here).

The MoE block follows the Bailing-MoE-V2 / Ling recipe at toy size:
  * fp32 router gate [H, E], sigmoid scores, an expert-score correction bias that is used for
    *selection only*;
  * group-limited selection: E experts in ``n_group`` groups, a group's score is the sum of its
    top-2 biased scores, the best ``topk_group`` groups stay eligible;
  * top-k experts, weights gathered from the un-biased scores, renormalised, times
    ``routed_scaling_factor``;
  * SwiGLU experts ``down(silu(gate(x)) * up(x))``, computed densely for every expert and combined
    with a [tokens, experts] weight matrix built from one-hot ids; one shared expert;
  * pre-RMSNorm and a residual around every MoE block; bf16 activations, fp32 router.

Example::

    import jax
    from ling_moe import LingConfig, init_params, forward

    cfg = LingConfig()
    params = init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 64, cfg.hidden_size), cfg.dtype)
    y, expert_ids = jax.jit(forward)(params, x)    # y: [2, 64, H], expert_ids: [layers, 2, 64, k]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LingConfig:
    hidden_size: int = 256
    moe_intermediate_size: int = 64
    num_experts: int = 64
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    num_layers: int = 4
    rms_norm_eps: float = 1e-6
    dtype: Any = jnp.bfloat16


DEFAULT_CONFIG = LingConfig()


def init_params(key: jax.Array, cfg: LingConfig) -> Params:
    """Random weights: a list of per-layer dicts (bf16 experts, fp32 router gate and bias)."""
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    shared_i = i * cfg.num_shared_experts

    def dense(k: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any = cfg.dtype) -> jax.Array:
        return (jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

    layers = []
    for key_l in jax.random.split(key, cfg.num_layers):
        ks = jax.random.split(key_l, 8)
        layers.append(
            {
                "norm": jnp.ones((h,), cfg.dtype),
                "gate": dense(ks[0], (h, e), h, jnp.float32),  # router stays fp32
                # trained models end up with a small per-expert correction bias
                "e_score_correction_bias": 0.01 * jax.random.normal(ks[1], (e,), jnp.float32),
                "experts": {
                    "gate_proj": dense(ks[2], (e, h, i), h),
                    "up_proj": dense(ks[3], (e, h, i), h),
                    "down_proj": dense(ks[4], (e, i, h), i),
                },
                "shared_expert": {
                    "gate_proj": dense(ks[5], (h, shared_i), h),
                    "up_proj": dense(ks[6], (h, shared_i), h),
                    "down_proj": dense(ks[7], (shared_i, h), shared_i),
                },
            }
        )
    return {"layers": layers}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def group_limited_topk(cfg: LingConfig, scores: jax.Array) -> jax.Array:
    """Expert ids [T, k]: top-k among the experts of the `topk_group` best groups."""
    num_tokens = scores.shape[0]
    grouped = scores.reshape(num_tokens, cfg.n_group, -1)
    group_scores = lax.top_k(grouped, 2)[0].sum(axis=-1)  # [T, n_group]
    _, group_idx = lax.top_k(group_scores, cfg.topk_group)  # [T, topk_group]
    group_mask = jnp.zeros_like(group_scores).at[jnp.arange(num_tokens)[:, None], group_idx].set(1.0)
    score_mask = jnp.broadcast_to(group_mask[:, :, None], grouped.shape).reshape(num_tokens, -1)
    masked_scores = jnp.where(score_mask.astype(bool), scores, -jnp.inf)
    _, topk_idx = lax.top_k(masked_scores, cfg.num_experts_per_tok)
    return topk_idx


def router(cfg: LingConfig, p: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Routing weights (fp32) and expert ids for tokens x [T, H]."""
    logits = x.astype(jnp.float32) @ p["gate"].astype(jnp.float32)
    scores = jax.nn.sigmoid(logits)
    scores_for_routing = scores + p["e_score_correction_bias"]
    topk_idx = group_limited_topk(cfg, scores_for_routing)
    topk_weight = jnp.take_along_axis(scores, topk_idx, axis=-1)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        topk_weight = topk_weight / (topk_weight.sum(axis=-1, keepdims=True) + 1e-20)
    topk_weight = topk_weight * cfg.routed_scaling_factor
    return topk_weight, topk_idx


def swiglu(x: jax.Array, gate_proj: jax.Array, up_proj: jax.Array, down_proj: jax.Array) -> jax.Array:
    return (jax.nn.silu(x @ gate_proj) * (x @ up_proj)) @ down_proj


def moe_block(cfg: LingConfig, p: Params, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch, seq, h = hidden.shape
    x = hidden.reshape(-1, h)
    topk_weight, topk_idx = router(cfg, p, x)

    # every expert on every token, then keep the routed ones with a [T, E] combine matrix
    w = p["experts"]
    gate = jnp.einsum("th,ehi->tei", x, w["gate_proj"])
    up = jnp.einsum("th,ehi->tei", x, w["up_proj"])
    expert_out = jnp.einsum("tei,eih->teh", jax.nn.silu(gate) * up, w["down_proj"])
    combine = jnp.sum(
        jax.nn.one_hot(topk_idx, cfg.num_experts, dtype=jnp.float32) * topk_weight[..., None], axis=1
    )
    routed = jnp.einsum("teh,te->th", expert_out, combine.astype(x.dtype))

    s = p["shared_expert"]
    out = routed + swiglu(x, s["gate_proj"], s["up_proj"], s["down_proj"])
    return out.reshape(batch, seq, h), topk_idx.reshape(batch, seq, -1)


def forward(params: Params, x: jax.Array, cfg: LingConfig = DEFAULT_CONFIG) -> tuple[jax.Array, jax.Array]:
    """The FFN stack: x [B, S, H] -> (y [B, S, H], expert ids [num_layers, B, S, k])."""
    all_ids = []
    for p in params["layers"]:
        out, ids = moe_block(cfg, p, rms_norm(x, p["norm"], cfg.rms_norm_eps))
        x = x + out
        all_ids.append(ids)
    return x, jnp.stack(all_ids)
