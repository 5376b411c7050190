"""EasyDeL 0.3.0 MoE blocks: nine models, three ``moe_method`` paths, at the tiny size by default.

Each case builds one model's sparse-MoE block (float32; at the tiny size hidden 32, expert FFN 64,
8 experts, top-2; Llama4 is top-1 as it ships; ``size`` sets these, see ``tests/real/case.py``) under
the config's mesh, re-draws every weight from N(0, 0.2) so no output is tiny (EasyDeL's own
initializers use std 0.01-0.02), and runs ``fn(params, x)`` on ``x: [1, size.tokens, size.hidden]``.
``BaseMoeModule.moe_call`` serves Mixtral, Qwen3-MoE, Qwen2-MoE, DeepSeek-V3,
GPT-OSS and Llama4 (FUSED_MOE: sort + ``ragged_dot`` in a ``shard_map``; DENSE_MOE: expert weights
gathered per token; STANDARD_MOE: sort + ``ragged_dot`` without ``shard_map``); Grok-1, DBRX and PhiMoE
loop over their experts in Python.

Example::

    ~/.cache/moefuse-real/easydel/bin/python tests/real/run_case.py easydel/mixtral_fused_moe
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from tests.real.case import TINY, Built, RealCase, Size

WEIGHT_STD = 0.2


@dataclasses.dataclass(frozen=True)
class Block:
    """Where one model's MoE block lives in EasyDeL and how its config is spelled at a size."""

    module: str  # e.g. "easydel.modules.mixtral.modeling_mixtral"
    block: str  # the block class in `module`
    config: str  # the config class, imported from "easydel"
    config_kwargs: Callable[[Size], dict[str, Any]]  # the size's fields (and the attention fields)
    block_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


ATTENTION = dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1, vocab_size=64)

MIXTRAL = Block(
    "easydel.modules.mixtral.modeling_mixtral",
    "MixtralSparseMoeBlock",
    "MixtralConfig",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_local_experts=size.experts,
        num_experts_per_tok=size.top_k,
    ),
)
QWEN3_MOE = Block(
    "easydel.modules.qwen3_moe.modeling_qwen3_moe",
    "Qwen3MoeSparseBlock",
    "Qwen3MoeConfig",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        moe_intermediate_size=size.ffn,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
    ),
)
QWEN2_MOE = Block(
    "easydel.modules.qwen2_moe.modeling_qwen2_moe",
    "Qwen2MoeSparseBlock",
    "Qwen2MoeConfig",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        moe_intermediate_size=size.ffn,
        shared_expert_intermediate_size=size.ffn,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
    ),
)
DEEPSEEK_V3 = Block(
    "easydel.modules.deepseek_v3.modeling_deepseek",
    "DeepseekV3MoE",
    "DeepseekV3Config",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        moe_intermediate_size=size.ffn,
        n_routed_experts=size.experts,
        n_shared_experts=1,
        num_experts_per_tok=size.top_k,
        n_group=4,
        topk_group=2,
    ),
    dict(layer_idx=0),
)
GPT_OSS = Block(
    "easydel.modules.gpt_oss.modeling_gpt_oss",
    "GptOssMLP",
    "GptOssConfig",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_local_experts=size.experts,
        num_experts_per_tok=size.top_k,
    ),
)
LLAMA4 = Block(
    "easydel.modules.llama4.modeling_llama4",
    "Llama4TextMoe",
    "Llama4TextConfig",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        intermediate_size_mlp=size.ffn,
        num_local_experts=size.experts,
        num_experts_per_tok=1,  # top-1 as Llama4 ships, at every size
    ),
)
GROK_1 = Block(
    "easydel.modules.grok_1.modeling_grok_1",
    "Grok1SparseMoeBlock",
    "Grok1Config",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
    ),
)
# EasyDeL 0.3.0's DbrxConfig comes out with ffn_config.ffn_hidden_size == d_model whatever is passed:
# DBRX's experts are size.hidden wide (32 at the tiny size, 256 at CPU_REALISTIC), not size.ffn
DBRX = Block(
    "easydel.modules.dbrx.modeling_dbrx",
    "DbrxFFN",
    "DbrxConfig",
    lambda size: dict(
        d_model=size.hidden,
        n_heads=4,
        n_layers=1,
        vocab_size=64,
        ffn_config=dict(ffn_hidden_size=size.ffn, moe_num_experts=size.experts, moe_top_k=size.top_k),
    ),
)
PHIMOE = Block(
    "easydel.modules.phimoe.modeling_phimoe",
    "PhiMoeSparseMoeBlock",
    "PhiMoeConfig",
    lambda size: dict(
        ATTENTION,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_local_experts=size.experts,
        num_experts_per_tok=size.top_k,
    ),
    dict(layer_idx=0),
)


def build_block(block: Block, moe_method: str | None = None, size: Size = TINY) -> Built:
    """The block as ``fn(params, x)`` under its config's mesh; ``moe_method`` names a ``MoEMethods``."""
    import importlib

    from tests.real.shims import easydel_cpu

    easydel_cpu.activate()
    import easydel
    import jax
    import jax.numpy as jnp
    from easydel.layers.moe import MoEMethods
    from flax import nnx

    config_cls = getattr(easydel, block.config)
    cfg = config_cls(**block.config_kwargs(size))
    if moe_method is not None:
        cfg.moe_method = MoEMethods[moe_method]
        cfg.moe_force_xla_gmm = True
    block_cls = getattr(importlib.import_module(block.module), block.block)
    with cfg.mesh:
        module = block_cls(
            cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0), **block.block_kwargs
        )
    graphdef, params = nnx.split(module)
    params = redraw(params, jax.random.key(0))

    def forward(params: Any, x: jax.Array) -> Any:
        return nnx.merge(graphdef, params)(x)

    x = jax.random.normal(jax.random.key(1), (1, size.tokens, size.hidden), jnp.float32)
    return Built(fn=forward, args=(params, x), context=lambda: cfg.mesh)


def redraw(state: Any, key: Any) -> Any:
    """Every floating leaf of ``state`` re-drawn from N(0, WEIGHT_STD), other leaves kept."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree,
        [
            WEIGHT_STD * jax.random.normal(k, leaf.shape, leaf.dtype)
            if jnp.issubdtype(leaf.dtype, jnp.floating)
            else leaf
            for k, leaf in zip(keys, leaves)
        ],
    )


def case(name: str, block: Block, moe_method: str | None = None, **kwargs: Any) -> RealCase:
    return RealCase(
        lib="easydel", name=name, build=functools.partial(build_block, block, moe_method), **kwargs
    )


CASES: tuple[RealCase, ...] = (
    case("mixtral_fused_moe", MIXTRAL, "FUSED_MOE"),
    case("qwen3_moe_fused_moe", QWEN3_MOE, "FUSED_MOE"),
    case("qwen2_moe_fused_moe", QWEN2_MOE, "FUSED_MOE"),
    # the upstream MoEGate hands its top-k weights [T, k] on where [T, E] logits are expected: the
    # layer's top-k of those k "logits" is the routing decision (ids 0 and 1 of the 8 experts), read as
    # a route of 2 candidates because its ids index the 8 experts' weights and counts
    case("deepseek_v3_fused_moe", DEEPSEEK_V3, "FUSED_MOE"),
    # biases gathered by each sorted row's expert as jnp.repeat(arange(E), sizes); bf16 tokens
    # against f32 weights in ragged_dots rounding to bf16, upcast, biases and activation in f32
    case("gpt_oss_fused_moe", GPT_OSS, "FUSED_MOE", expect=("route", "route", "moe")),
    # outside the shard_map: top-1 of the logits, their sigmoid kept at the chosen expert as a dense
    # [T, E] matrix (a route with that layout); inside: a top-1 of that matrix (a route taking it as
    # given: its ids differ from the outer ones where a sigmoid underflows to 0), each token times its
    # weight before the experts and the one output summed with weight 1 (moe with weights_on_input)
    case("llama4_fused_moe", LLAMA4, "FUSED_MOE", expect=("route", "route", "moe")),
    case("mixtral_dense_moe", MIXTRAL, "DENSE_MOE"),
    # float32 rows and weights, ragged_dots rounding to bfloat16 (preferred_element_type), the hidden
    # rows upcast before the down projection: MoeParams.projection_dtype / hidden_dtype
    case("mixtral_standard_moe", MIXTRAL, "STANDARD_MOE"),
    case("deepseek_v3_dense_moe", DEEPSEEK_V3, "DENSE_MOE"),  # the MoEGate bug above
    # experts kept as separate modules: each expert's three matrices are inputs of their own, taken by the
    # fused op as they are (PerExpert); [1, T, D] tokens multiplied as they are; hand-written tanh GeGLU
    case("grok_1_loop", GROK_1),
    # batch 1: [1, T, D] activations, every matmul operand `squeeze(x[None])`, the combine in [1, T, D]
    case("dbrx_loop", DBRX),
    # SparseMixer routing (argmax, masked by a scatter, argmax again; no top_k): the router stays as
    # written, the moe op takes its concatenated ids and weights; each expert's weight is the sum over
    # the two slots written out, where(ids[:, j] == e, w[:, j], 0); experts as separate modules
    case("phimoe_loop", PHIMOE, expect=("moe",)),
)
