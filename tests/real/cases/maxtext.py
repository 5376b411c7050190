"""MaxText 0.2.5 ``maxtext.layers.moe.RoutedMoE``, four of its paths, at the tiny size by default.

Config as MaxText's own unit tests build it (``pyconfig.initialize([None, base.yml], **overrides)``),
float32, ``megablox=False``; the forward is ``fn(params, x)`` with the module's ``nnx.Param`` state and
``x: [1, size.tokens, size.hidden]`` (``size`` sets the model, expert FFN and dense MLP widths, the
experts and top-k; see ``tests/real/case.py``).

Example::

    ~/.cache/moefuse-real/maxtext/bin/python tests/real/run_case.py maxtext/dense_dropless
"""

from __future__ import annotations

import functools
from typing import Any

from tests.real.case import TINY, Built, RealCase, Size

DENSE = dict(decoder_block="mixtral", sparse_matmul=False, capacity_factor=-1)


def size_settings(size: Size) -> dict[str, int]:
    """MaxText's config fields for ``size``: one sequence of ``size.tokens`` tokens."""
    return dict(
        base_emb_dim=size.hidden,
        base_mlp_dim=size.ffn,
        base_moe_mlp_dim=size.ffn,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
        per_device_batch_size=1,
        max_target_length=size.tokens,
    )


def build_routed_moe(overrides: dict[str, Any], size: Size = TINY) -> Built:
    import os

    import jax
    import maxtext
    from flax import nnx
    from maxtext.configs import pyconfig
    from maxtext.layers import initializers, moe
    from maxtext.utils import maxtext_utils

    base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    settings = dict(
        run_name="moefuse_real",
        enable_checkpointing=False,
        skip_jax_distributed_system=True,
        dtype="float32",
        weight_dtype="float32",
        megablox=False,
        **size_settings(size),
    )
    settings.update(overrides)
    cfg = pyconfig.initialize([None, base], **settings)
    mesh = jax.sharding.Mesh(maxtext_utils.create_device_mesh(cfg), cfg.mesh_axes)
    with jax.set_mesh(mesh):
        layer = moe.RoutedMoE(
            cfg,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            mesh,
            kernel_init=initializers.nd_dense_init(1.0, "fan_in", "truncated_normal"),
            kernel_axes=("embed", "mlp"),
            intermediate_dim=cfg.moe_mlp_dim,
            dtype=cfg.dtype,
            weight_dtype=cfg.weight_dtype,
            rngs=nnx.Rngs(0),
        )
    graph, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(params: Any, x: jax.Array) -> jax.Array:
        out, _load_balance_loss, _bias_updates = nnx.merge(graph, params, rest)(x)
        return out

    x = jax.random.normal(jax.random.key(1), (1, size.tokens, cfg.emb_dim), cfg.dtype)
    return Built(fn=forward, args=(params, x), context=lambda: jax.set_mesh(mesh))


CASES = (
    RealCase(
        lib="maxtext",
        name="dense_dropless",
        build=functools.partial(build_routed_moe, DENSE),
    ),
    RealCase(
        lib="maxtext",
        name="dense_capacity",
        # capacity factor 0.5: half the routed choices do not fit, so the fused op must drop exactly the
        # ones MaxText drops (top-k weights scattered to [B, S, E], slots one_hot(pos + 1, C + 1)[..., 1:])
        build=functools.partial(build_routed_moe, {**DENSE, "capacity_factor": 0.5}),
    ),
    RealCase(
        lib="maxtext",
        name="sparse_ragged_dot",
        # rows padded to a tile multiple before each ragged_dot and cut back after; [1, T, k] ids
        build=functools.partial(build_routed_moe, {"decoder_block": "mixtral", "sparse_matmul": True}),
    ),
    RealCase(
        lib="maxtext",
        name="deepseek_group_routing",
        build=functools.partial(
            build_routed_moe,
            {
                **DENSE,
                "model_name": "deepseek3-tiny",
                "override_model_config": True,
                "decoder_block": "deepseek",
                "n_routing_groups": 4,
                "topk_routing_group": 2,
                "routed_score_func": "sigmoid",
                "routed_bias": True,
            },
        ),
    ),
)
