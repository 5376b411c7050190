"""tpu-inference 0.32.0 ``JaxMoE`` (``tpu_inference.layers.jax.moe.moe``) at the tiny size, three paths.

Built as its own ``tests/layers/jax/moe/test_moe.py`` builds the layer: a ``("model", "data")`` mesh
(here 1 x 1), a router, ``JaxMoE(..., moe_backend=..., quant_config=UnquantizedConfig({}),
random_init=True)``, float32, SiLU-gated experts, input ``[T, D]``; the forward is
``fn(state, x)`` over the module's ``nnx`` state and returns the layer's output (not the ``None``
it pairs it with).

- ``dense_mat``: ``Router`` (top-k of the logits, softmax over the k) + the DENSE_MAT backend (every
  expert on every token, combine weights ``sum(one_hot(ids) * weights)``, ``"TED,TE -> TD"``);
- ``megablox_gmm``: the same router + MEGABLX_GMM (argsort of the expert ids, rows repeated and
  sorted, padded to the 128-row tile, three megablox Pallas ``gmm`` calls, unsort and a weighted sum
  over k, all inside a ``shard_map``);
- ``deepseek_v3_router``: ``DeepSeekV3Router`` (sigmoid scores, correction bias added for the
  selection only, 4 groups each scored by its top-2 sum, the top 2 groups kept by a
  ``where(mask, scores, -inf)``, top-k ids, un-biased scores gathered and renormalised) + DENSE_MAT.

CPU adaptations (nothing else is patched):

- ``tests/real/shims/tpu_inference_cpu.py``: stand-ins for ``vllm`` / ``torch`` / ``torchax``, which the
  package imports at module level but this layer never calls, and ``TPU_*`` variables so its import
  does not ask a cloud metadata server what it runs on.
- MEGABLX_GMM: XLA:CPU lowers Pallas kernels only in interpret mode, and the layer calls
  ``megablox_gmm`` without it; the runner's context patches ``tpu_inference.layers.jax.moe.utils
  .megablox_gmm`` with ``interpret=True`` (as ``sglang_jax.py`` does for its gmm). The case does
  not train: ``jax.grad`` of the ORIGINAL program raises ``NotImplementedError: interpret with
  dynamic grid bounds unsupported`` (the gmm's grid depends on the group sizes, and the megablox
  ``gmm`` has no custom VJP).
- DeepSeekV3Router: with ``random_init=True`` the library initialises its 1-D parameters to ones, so
  the correction bias would be the same for every expert and never change a selection; the builder
  sets it to random values (what loading a checkpoint does), so the biased selection is exercised.

Example::

    ~/.cache/moefuse-real/tpu_inference/bin/python tests/real/run_case.py tpu_inference/dense_mat
"""

from __future__ import annotations

import functools
from typing import Any

from tests.real.case import TINY, Built, RealCase, Size

N_GROUPS, TOPK_GROUPS = 4, 2  # DeepSeekV3Router group-limited routing at the tiny size (8 experts)


def build_jax_moe(backend: str, router_kind: str = "standard", size: Size = TINY) -> Built:
    import contextlib
    from unittest import mock

    from tests.real.shims import tpu_inference_cpu

    tpu_inference_cpu.activate()  # before the first tpu_inference import

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec
    from tpu_inference.layers.jax.moe import utils as moe_utils
    from tpu_inference.layers.jax.moe.moe import JaxMoE, Router
    from tpu_inference.layers.jax.moe.utils import MoEBackend, get_expert_parallelism
    from tpu_inference.layers.jax.quantization.unquantized import UnquantizedConfig

    moe_backend = MoEBackend[backend]
    dtype = jnp.float32
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("model", "data"))
    with jax.set_mesh(mesh):
        if router_kind == "deepseek_v3":
            from tpu_inference.models.jax.deepseek_v3 import DeepSeekV3Router

            # as DeepseekV2Moe builds its gate, at the tiny size's group counts
            router = DeepSeekV3Router(
                hidden_size=size.hidden,
                num_experts=size.experts,
                num_experts_per_tok=size.top_k,
                n_groups=N_GROUPS,
                topk_groups=TOPK_GROUPS,
                norm_topk_prob=True,
                routed_scaling_factor=1.0,  # unused by the router (SharedFusedMoe applies it)
                dtype=dtype,
                rngs=nnx.Rngs(0),
                activation_ffw_td=PartitionSpec("data", None),
                ed_sharding=PartitionSpec(None, None),
                e_sharding=PartitionSpec(None),
                random_init=True,
                scoring_func="sigmoid",
                moe_backend=moe_backend,
            )
            # random_init gives the bias ones (no effect on the selection); a checkpoint's is not uniform
            router.e_score_correction_bias.value = 0.1 * jax.random.normal(
                jax.random.key(2), (size.experts,), router.e_score_correction_bias.value.dtype
            )
        else:
            router = Router(
                dtype=dtype,
                hidden_size=size.hidden,
                num_experts=size.experts,
                num_experts_per_tok=size.top_k,
                router_act="softmax",
                rngs=nnx.Rngs(0),
                activation_ffw_td=("data", "model"),
                ed_sharding=(None, "model"),
                random_init=True,
                moe_backend=moe_backend,
                mesh=mesh,
            )
        layer = JaxMoE(
            dtype=dtype,
            num_local_experts=size.experts,
            hidden_size=size.hidden,
            intermediate_size_moe=size.ffn,
            hidden_act="silu",
            rngs=nnx.Rngs(1),
            router=router,
            mesh=mesh,
            activation_ffw_td=PartitionSpec("data", None),
            activation_ffw_ted=PartitionSpec("data", None),
            edf_sharding=PartitionSpec("model", None, None),
            efd_sharding=PartitionSpec("model", None, None),
            apply_expert_weight_before_computation=False,
            moe_backend=moe_backend,
            num_experts_per_tok=size.top_k,
            expert_axis_name="model",
            num_expert_parallelism=get_expert_parallelism("model", mesh),
            random_init=True,
            quant_config=UnquantizedConfig({}),
        )
    graph, state = nnx.split(layer)

    def forward(state: Any, x: jax.Array) -> jax.Array:
        out, _routed_experts = nnx.merge(graph, state)(x)
        return out

    x = jax.random.normal(jax.random.key(1), (size.tokens, size.hidden), dtype)

    @contextlib.contextmanager
    def context() -> Any:
        # XLA:CPU lowers Pallas kernels only in interpret mode; the layer calls megablox_gmm without it
        interpret_gmm = functools.partial(moe_utils.megablox_gmm, interpret=True)
        with jax.set_mesh(mesh), mock.patch.object(moe_utils, "megablox_gmm", interpret_gmm):
            yield

    return Built(fn=forward, args=(state, x), context=context)


CASES = (
    RealCase(
        lib="tpu_inference",
        name="dense_mat",
        build=functools.partial(build_jax_moe, "DENSE_MAT"),
    ),
    RealCase(
        lib="tpu_inference",
        name="megablox_gmm",
        build=functools.partial(build_jax_moe, "MEGABLX_GMM"),
        trains=False,  # jax.grad of the original program raises (interpret-mode gmm, dynamic grid)
        known_miss=(
            "moe (in shard_map): no combine of expert outputs by router weights (unpermute/"
            "combine_weights, sum over k of expert rows * weights): the expert rows come from three "
            "megablox Pallas gmm calls (pallas_call) on rows sorted by expert and padded to the 128-row "
            "tile, sliced and unsorted by a gather after; the router fuses"
        ),
    ),
    RealCase(
        lib="tpu_inference",
        name="deepseek_v3_router",
        build=functools.partial(build_jax_moe, "DENSE_MAT", "deepseek_v3"),
        # the group mask is applied per group: where(flags[T, G, 1], scores.reshape(T, G, E/G), -inf)
        # flattened back to [T, E]
    ),
)
