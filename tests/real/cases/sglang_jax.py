"""SGLang-JAX 0.0.2 ``GateLogit`` + ``EPMoE``: single device, and expert parallel; tiny size by default.

Both build at a ``size`` (``tests/real/case.py``): ``x: [size.tokens, size.hidden]``, ``size.experts``
experts of FFN width ``size.ffn``, top ``size.top_k``.

Upstream bug: ``EPMoE._single_device_forward`` is defined twice; the 3-argument one shadows the
2-argument one, so ``EPMoE.__call__`` with ``expert_parallel_size == 1`` raises TypeError. The single
device case does the shadowed method's top-k + softmax + renormalisation here, as it is written
upstream, and calls the surviving method with ``[B, S, H]`` input (the shape it reshapes from).
The expert-parallel case (``shard_map``, sort, Pallas gmm in interpret mode,
``ragged_all_to_all``) traces and lowers, but XLA:CPU cannot compile ``ragged_all_to_all``: ``runs=False``.

Example::

    ~/.cache/moefuse-real/sglang_jax/bin/python tests/real/run_case.py sglang_jax/single_device
"""

from __future__ import annotations

import functools
from typing import Any

from tests.real.case import TINY, Built, RealCase, Size


def build_epmoe(expert_parallel_size: int, size: Size = TINY) -> Built:
    import contextlib
    import types
    from unittest import mock

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from sgl_jax.srt.layers import moe
    from sgl_jax.srt.layers.moe import EPMoE, GateLogit

    devices = np.array(jax.devices()[:expert_parallel_size]).reshape(expert_parallel_size, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "tensor"))
    config = types.SimpleNamespace(hidden_size=size.hidden)
    with jax.set_mesh(mesh):
        gate = GateLogit(size.hidden, size.experts, model_name="moefuse_real", rngs=nnx.Rngs(0))
        experts = EPMoE(
            config,
            num_experts=size.experts,
            num_experts_per_tok=size.top_k,
            expert_parallel_size=expert_parallel_size,
            mesh=mesh,
            intermediate_dim=size.ffn,
            weight_dtype=jnp.float32,
            dtype=jnp.float32,
            rngs=nnx.Rngs(0),
        )
    gate_graph, gate_params = nnx.split(gate)
    experts_graph, experts_params = nnx.split(experts)

    def forward(params: Any, x: jax.Array) -> jax.Array:
        gate_params, experts_params = params
        router_logits = nnx.merge(gate_graph, gate_params)(x)
        layer = nnx.merge(experts_graph, experts_params)
        if expert_parallel_size > 1:
            return layer(x, router_logits)
        # the shadowed 2-argument EPMoE._single_device_forward, as written upstream
        top_k_logits, top_k_indices = jax.lax.top_k(router_logits, size.top_k)
        top_k_weights = jax.nn.softmax(top_k_logits.astype(jnp.float32), axis=-1).astype(layer.dtype)
        top_k_weights = top_k_weights / jnp.sum(top_k_weights, axis=-1, keepdims=True)
        return layer._single_device_forward(x[None], top_k_indices, top_k_weights)[0]

    x = jax.random.normal(jax.random.key(1), (size.tokens, size.hidden), jnp.float32)

    @contextlib.contextmanager
    def context() -> Any:
        # XLA:CPU lowers Pallas kernels only in interpret mode; the layer calls its gmm without it
        with jax.set_mesh(mesh), mock.patch.object(moe, "gmm", functools.partial(moe.gmm, interpret=True)):
            yield

    return Built(fn=forward, args=((gate_params, experts_params), x), context=context)


CASES = (
    RealCase(lib="sglang_jax", name="single_device", build=functools.partial(build_epmoe, 1)),
    RealCase(
        lib="sglang_jax",
        name="expert_parallel_2",
        build=functools.partial(build_epmoe, 2),
        runs=False,
        trains=False,
        devices=2,
        known_miss="not fused yet (no crash since shard_map bodies trace under their mesh axes): the "
        "block's grouped matmuls are Pallas gmm calls inside the shard_map, opaque to the matcher",
    ),
)
