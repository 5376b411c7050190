"""MoE router spellings, as different real authors write them.

Families (see ``tests/zoo/__init__.py`` for the ``expect`` keys):

F1  softmax over experts -> top-k -> optional renorm / scaling        (Mixtral, Qwen3-MoE, Switch, DS-V2)
F2  top-k on raw logits -> softmax over the k selected logits         (GPT-OSS, Mixtral alt)
F3  sigmoid, selection-only bias, gather unbiased, renorm, scale      (DeepSeek-V3 without groups)
F4  F3 (or softmax) + group-limited selection                         (DeepSeek-V3, Ling-2.6, DS-V2)
F5  per-expert scale gathered at the chosen ids, optional logit bias  (Gemma 4)

Selection is always ``jax.lax.top_k``.  All shapes are small and all inputs come from
``jax.random`` with fixed seeds.  Cases with ``ties`` in the name contain exactly tied scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from . import ZooCase, duplicate, normal, router_expect

F32 = jnp.float32
BF16 = jnp.bfloat16


def _dense_experts(seed: int, num_experts: int, d: int, layers: int | None = None) -> jax.Array:
    shape = (num_experts, d, d) if layers is None else (layers, num_experts, d, d)
    return normal(seed, shape, scale=d**-0.5)


# ---------------------------------------------------------------------------------------------
# F1: softmax -> top-k -> (renorm) -> (scale)
# ---------------------------------------------------------------------------------------------


def make_f1_mixtral_plain() -> ZooCase:
    """Mixtral-style: softmax, top-2 of 8, renormalise. Plain jnp."""
    num_tokens, d_model, num_experts, top_k = 32, 32, 8, 2
    x = normal(0, (num_tokens, d_model))
    w_gate = normal(1, (d_model, num_experts), scale=d_model**-0.5)

    def router(x, w_gate):
        logits = x @ w_gate
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = lax.top_k(probs, top_k)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights, ids

    return ZooCase(
        "f1_mixtral_plain",
        router,
        (x, w_gate),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="x[T,D] @ W[D,E], softmax, lax.top_k, renorm with jnp.sum",
    )


def make_f1_switch_top1() -> ZooCase:
    """Switch Transformer: bf16 activations, router in float32, top-1, no renorm. [B,S,D] input."""
    batch, seq, d_model, num_experts = 2, 16, 32, 16
    hidden = normal(2, (batch, seq, d_model), BF16)
    params = {"router": {"kernel": normal(3, (d_model, num_experts), scale=d_model**-0.5)}}

    def switch_router(params, hidden):
        router_logits = jnp.einsum("bsd,de->bse", hidden.astype(jnp.float32), params["router"]["kernel"])
        router_probs = jax.nn.softmax(router_logits, axis=-1)
        expert_gate, expert_index = jax.lax.top_k(router_probs, 1)
        return expert_gate, expert_index

    return ZooCase(
        "f1_switch_top1",
        switch_router,
        (params, hidden),
        "F1",
        router_expect(1, num_experts, "softmax"),
        note="top-1 via lax.top_k(k=1), bf16 [B,S,D] cast to f32 before einsum, nested dict params",
    )


class _Qwen3MoeRouterPort:
    """Line-by-line port of HF Qwen3MoeSparseMoeBlock routing (torch Linear weight is [E, D])."""

    def __init__(self, gate_weight, top_k, norm_topk_prob):
        self.gate_weight = gate_weight  # [num_experts, hidden]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def __call__(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        # router_logits: (batch * sequence_length, n_experts)
        router_logits = jnp.matmul(hidden_states, self.gate_weight.T)
        routing_weights = jax.nn.softmax(router_logits.astype(jnp.float32), axis=1)
        routing_weights, selected_experts = jax.lax.top_k(routing_weights, self.top_k)
        if self.norm_topk_prob:  # only diff with mixtral sparse moe block!
            routing_weights = routing_weights / routing_weights.sum(axis=-1, keepdims=True)
        # we cast back to the input dtype
        routing_weights = routing_weights.astype(hidden_states.dtype)
        return routing_weights, selected_experts


def make_f1_qwen3_hf_port() -> ZooCase:
    """Qwen3-MoE HF port: bf16 logits, softmax in f32 over axis=1, top-4 of 32, norm_topk_prob."""
    batch, seq, d_model, num_experts, top_k = 2, 8, 32, 32, 4
    hidden = normal(4, (batch, seq, d_model), BF16)
    gate_weight = normal(5, (num_experts, d_model), BF16, scale=d_model**-0.5)

    def run(gate_weight, hidden):
        return _Qwen3MoeRouterPort(gate_weight, top_k, norm_topk_prob=True)(hidden)

    return ZooCase(
        "f1_qwen3_hf_port",
        run,
        (gate_weight, hidden),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="gate weight stored [E,D] used as W.T; logits in bf16; softmax(axis=1) in f32; bf16 output",
    )


def make_f1_deepseek_v2_greedy() -> ZooCase:
    """DeepSeek-V2 topk_method='greedy': softmax, top-6 of 64, no renorm, routed_scaling_factor."""
    num_tokens, d_model, num_experts, top_k = 24, 32, 64, 6
    routed_scaling_factor = 16.0
    x = normal(6, (num_tokens, d_model))
    params = {"gate": normal(7, (d_model, num_experts), scale=d_model**-0.5)}

    def moe_gate(params, x):
        logits = jnp.einsum("td,de->te", x, params["gate"])
        scores = jax.nn.softmax(logits, axis=-1)
        topk_weight, topk_idx = lax.top_k(scores, top_k)
        topk_weight = topk_weight * routed_scaling_factor
        return topk_weight, topk_idx

    return ZooCase(
        "f1_deepseek_v2_greedy",
        moe_gate,
        (params, x),
        "F1",
        router_expect(top_k, num_experts, "softmax", scale=routed_scaling_factor),
        note="einsum logits; no renorm; weights * 16.0",
    )


class _NnxMoeGate(nnx.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs):
        self.gate = nnx.Linear(d_model, num_experts, use_bias=False, rngs=rngs)
        self.top_k = top_k

    def __call__(self, x):
        logits = self.gate(x)
        probs = jax.nn.softmax(logits)
        weights, ids = jax.lax.top_k(probs, self.top_k)
        weights /= weights.sum(-1, keepdims=True)
        return weights, ids


def make_f1_nnx_linear() -> ZooCase:
    """Flax NNX module with an nnx.Linear gate, closed over by the traced function."""
    batch, seq, d_model, num_experts, top_k = 2, 12, 32, 16, 2
    model = _NnxMoeGate(d_model, num_experts, top_k, rngs=nnx.Rngs(8))
    x = normal(9, (batch, seq, d_model))

    def fn(x):
        return model(x)

    return ZooCase(
        "f1_nnx_linear",
        fn,
        (x,),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="nnx.Linear(use_bias=False) gate closed over (weights are constants), [B,S,D]",
    )


def make_f1_vmap_per_token() -> ZooCase:
    """Router written for one token x[D] and jax.vmap-ed over tokens."""
    num_tokens, d_model, num_experts, top_k = 20, 32, 16, 4
    x = normal(10, (num_tokens, d_model))
    w = normal(11, (d_model, num_experts), scale=d_model**-0.5)

    def route_one(w, token):
        logits = jnp.dot(token, w)  # [E]
        p = jax.nn.softmax(logits)
        vals, idx = lax.top_k(p, top_k)
        return vals / vals.sum(), idx

    def fn(w, x):
        return jax.vmap(route_one, in_axes=(None, 0))(w, x)

    return ZooCase(
        "f1_vmap_per_token",
        fn,
        (w, x),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="per-token router [D]->[E] under jax.vmap",
    )


def make_f1_ties_duplicated_columns() -> ZooCase:
    """Duplicated gate columns: experts i and i+4 have bit-identical logits (exact ties)."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(12, (num_tokens, d_model))
    half = normal(13, (d_model, num_experts // 2), scale=d_model**-0.5)
    w_gate = duplicate(half, axis=1)

    def router(x, w_gate):
        probs = jax.nn.softmax(x @ w_gate, axis=-1)
        topv, topi = lax.top_k(probs, top_k)
        return topv / topv.sum(axis=-1, keepdims=True), topi

    return ZooCase(
        "f1_ties_duplicated_columns",
        router,
        (x, w_gate),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="exact ties: every token's top-2 is a tied pair (e, e+4); lax.top_k breaks ties by lower id",
    )


def make_f1_bf16_dot_general() -> ZooCase:
    """bf16 weights and activations, lax.dot_general with preferred_element_type=f32."""
    num_tokens, d_model, num_experts, top_k = 32, 32, 16, 2
    x = normal(14, (num_tokens, d_model), BF16)
    w = normal(15, (d_model, num_experts), BF16, scale=d_model**-0.5)

    def router(x, w):
        logits = lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_i = lax.top_k(probs, top_k)
        top_p = top_p / top_p.sum(-1, keepdims=True)
        return top_p.astype(x.dtype), top_i

    return ZooCase(
        "f1_bf16_dot_general",
        router,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="lax.dot_general(bf16, bf16, preferred_element_type=f32); weights cast back to bf16",
    )


def make_f1_scan_layers() -> ZooCase:
    """Router inside a jax.lax.scan over layers, stacked gate weights [L, D, E]; dense expert combine."""
    num_layers, num_tokens, d_model, num_experts, top_k = 3, 16, 32, 8, 2
    x = normal(16, (num_tokens, d_model))
    gates = normal(17, (num_layers, d_model, num_experts), scale=d_model**-0.5)
    experts = _dense_experts(18, num_experts, d_model, layers=num_layers)

    def layer(h, layer_params):
        gate_w, expert_w = layer_params
        probs = jax.nn.softmax(h @ gate_w, axis=-1)
        weights, ids = lax.top_k(probs, top_k)  # no renorm
        all_out = jnp.einsum("td,edf->tef", h, expert_w)  # [T, E, D]
        picked = jnp.take_along_axis(all_out, ids[:, :, None], axis=1)  # [T, k, D]
        h = h + jnp.tanh(jnp.sum(weights[:, :, None] * picked, axis=1))
        return h, ids

    def model(x, gates, experts):
        h, ids_per_layer = lax.scan(layer, x, (gates, experts))
        return h, ids_per_layer

    return ZooCase(
        "f1_scan_layers",
        model,
        (x, gates, experts),
        "F1",
        router_expect(top_k, num_experts, "softmax"),
        count=1,
        note="lax.scan over 3 layers (one router in the body); ids also stacked out of the scan",
    )


def make_f1_unrolled_4layer() -> ZooCase:
    """Python-unrolled 4-layer MoE with one-hot combine weights."""
    num_layers, num_tokens, d_model, num_experts, top_k = 4, 16, 32, 8, 2
    x = normal(19, (num_tokens, d_model))
    params = [
        {
            "router": normal(20 + i, (d_model, num_experts), scale=d_model**-0.5),
            "experts": _dense_experts(40 + i, num_experts, d_model),
        }
        for i in range(num_layers)
    ]

    def moe_layer(p, h):
        router_probs = jax.nn.softmax(jnp.matmul(h, p["router"]), axis=-1)
        gate_vals, expert_ids = jax.lax.top_k(router_probs, top_k)
        gate_vals = gate_vals / gate_vals.sum(axis=-1, keepdims=True)
        combine = jnp.sum(gate_vals[..., None] * jax.nn.one_hot(expert_ids, num_experts), axis=-2)  # [T, E]
        expert_out = jnp.einsum("td,edf->tef", h, p["experts"])
        return h + jnp.einsum("te,tef->tf", combine, expert_out)

    def model(params, x):
        h = x
        for p in params:
            h = moe_layer(p, h)
        return h

    return ZooCase(
        "f1_unrolled_4layer",
        model,
        (params, x),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        count=num_layers,
        note="4 routers unrolled by a python loop; combine via one_hot; returns only the hidden state",
    )


def make_f1_model_with_lm_head() -> ZooCase:
    """2-layer MoE LM whose vocab head does top-k (must NOT be fused) after two real routers."""
    num_tokens, d_model, num_experts, top_k, vocab = 8, 32, 16, 2, 4096
    x = normal(24, (num_tokens, d_model))
    params = {
        "layers": [
            {
                "gate": normal(25 + i, (d_model, num_experts), scale=d_model**-0.5),
                "experts": _dense_experts(27 + i, num_experts, d_model),
            }
            for i in range(2)
        ],
        "lm_head": normal(29, (d_model, vocab), scale=d_model**-0.5),
    }

    def model(params, x):
        h = x
        for layer in params["layers"]:
            probs = jax.nn.softmax(h @ layer["gate"], axis=-1)
            w, e = lax.top_k(probs, top_k)
            w = w / jnp.sum(w, -1, keepdims=True)
            expert_out = jnp.einsum("td,edf->tef", h, layer["experts"])
            sel = jnp.take_along_axis(expert_out, e[..., None], axis=1)
            h = h + jnp.einsum("tk,tkf->tf", w, sel)
        # greedy top-k candidate tokens from the LM head: not a router
        vocab_logits = h @ params["lm_head"]
        cand_logits, cand_tokens = lax.top_k(vocab_logits, 8)
        cand_probs = jax.nn.softmax(cand_logits, axis=-1)
        return cand_probs, cand_tokens

    return ZooCase(
        "f1_model_with_lm_head",
        model,
        (params, x),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        count=2,
        note="2 routers + an LM-head top-8-then-softmax over V=4096 which is NOT a router (count=2)",
    )


def _one_device_mesh(axis: str) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), (axis,))


def make_f1_sharded_named_logits() -> ZooCase:
    """MaxText-style: logits pinned by with_sharding_constraint and tagged with checkpoint_name."""
    batch, seq, d_model, num_experts, top_k = 2, 8, 32, 8, 2
    x = normal(300, (batch, seq, d_model))
    w = normal(301, (d_model, num_experts), scale=d_model**-0.5)
    spec = jax.sharding.NamedSharding(_one_device_mesh("data"), jax.sharding.PartitionSpec("data"))

    def router(x, w):
        logits = jnp.einsum("bsd,de->bse", x, w)
        logits = jax.lax.with_sharding_constraint(logits, spec)
        logits = checkpoint_name(logits, "router_logits")
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, ids = lax.top_k(probs, top_k)
        return weights / weights.sum(-1, keepdims=True), ids

    return ZooCase(
        "f1_sharded_named_logits",
        router,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="logits through sharding_constraint and name (checkpoint_name) before the softmax",
    )


def make_f1_shard_map_logits() -> ZooCase:
    """Gate matmul outside a shard_map; the router inside sees the logits as a body input."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(302, (num_tokens, d_model))
    w = normal(303, (d_model, num_experts), scale=d_model**-0.5)
    mesh = _one_device_mesh("expert")
    spec = jax.sharding.PartitionSpec()

    def route_local(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = lax.top_k(probs, top_k)
        return weights / jnp.sum(weights, -1, keepdims=True), ids

    def model(x, w):
        logits = x @ w
        return jax.shard_map(route_local, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(logits)

    return ZooCase(
        "f1_shard_map_logits",
        model,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="router body inside shard_map: its logits are a shard_map input, no matmul in sight",
    )


def make_f1_shard_map_probs_clamped_renorm() -> ZooCase:
    """Softmax outside a shard_map; inside, top-k of the probabilities it was handed, renormalised by
    a sum clamped away from zero."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(304, (num_tokens, d_model))
    w = normal(305, (d_model, num_experts), scale=d_model**-0.5)
    mesh = _one_device_mesh("expert")
    spec = jax.sharding.PartitionSpec()

    def route_local(probs):
        weights, ids = lax.top_k(probs, top_k)
        return weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-8), ids

    def model(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        return jax.shard_map(route_local, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(probs)

    return ZooCase(
        "f1_shard_map_probs_clamped_renorm",
        model,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "none", renorm=True),
        note="the body sees probabilities, not logits: route scores them as given; / max(sum, 1e-8)",
    )


def make_f1_shard_map_probs_as_given() -> ZooCase:
    """Softmax outside a shard_map; inside, the top-k values of the probabilities it was handed are
    the weights as they are (no renormalisation): the EasyDeL FUSED_MOE spelling."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(306, (num_tokens, d_model))
    w = normal(307, (d_model, num_experts), scale=d_model**-0.5)
    mesh = _one_device_mesh("expert")
    spec = jax.sharding.PartitionSpec()

    def model(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        return jax.shard_map(
            lambda p: tuple(lax.top_k(p, top_k)), mesh=mesh, in_specs=spec, out_specs=(spec, spec)
        )(probs)

    return ZooCase(
        "f1_shard_map_probs_as_given",
        model,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "none"),
        note="scores made outside the body (seen through View.outside): route takes them as given",
    )


def make_f1_remat_in_shard_map_sigmoid_as_given() -> ZooCase:
    """Sigmoid outside a shard_map, the top-k (of the scores times one) in a jax.checkpoint body
    inside it: the evidence is two levels up."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(308, (num_tokens, d_model))
    w = normal(309, (d_model, num_experts), scale=d_model**-0.5)
    mesh = _one_device_mesh("expert")
    spec = jax.sharding.PartitionSpec()

    @jax.checkpoint
    def pick(s):
        return tuple(lax.top_k(s * 1.0, top_k))

    def model(x, w):
        scores = jax.nn.sigmoid(x @ w)
        return jax.shard_map(pick, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(scores)

    return ZooCase(
        "f1_remat_in_shard_map_sigmoid_as_given",
        model,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "none"),
        note="sigmoid outside, top_k in a checkpoint body in the shard_map",
    )


def make_f1_temperature_logits() -> ZooCase:
    """Router temperature: logits divided by a run-time scalar before the softmax."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 16, 4
    x = normal(304, (num_tokens, d_model))
    w = normal(305, (d_model, num_experts), scale=d_model**-0.5)
    temperature = jnp.float32(0.7)

    def router(x, w, temperature):
        probs = jax.nn.softmax((x @ w) / temperature, axis=-1)
        weights, ids = lax.top_k(probs, top_k)
        return weights, ids

    return ZooCase(
        "f1_temperature_logits",
        router,
        (x, w, temperature),
        "F1",
        router_expect(top_k, num_experts, "softmax"),
        note="logits / temperature (an argument, not a literal)",
    )


def make_f3_hand_sigmoid_l1_renorm() -> ZooCase:
    """Sigmoid written 1 / (1 + exp(-x)), selection bias, weights renormalised by the L1 norm."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    x = normal(321, (num_tokens, d_model))
    w = normal(322, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(323, (num_experts,), scale=0.05)

    def router(x, w, bias):
        scores = 1.0 / (1.0 + jnp.exp(-(x @ w)))
        ids = lax.top_k(scores + bias, top_k)[1]
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        return 2.5 * weights / jnp.linalg.norm(weights, ord=1, axis=-1, keepdims=True), ids

    return ZooCase(
        "f3_hand_sigmoid_l1_renorm",
        router,
        (x, w, bias),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, scale=2.5, selection_bias=True),
        note="1 / (1 + exp(-logits)); 2.5 * w / norm(w, ord=1)",
    )


def make_f3_reduce_sum_logits() -> ZooCase:
    """Sigmoid router whose logits are spelled sum(x[:, None, :] * w.T, -1), then reshaped to [B, S, E]."""
    batch, seq, d_model, num_experts, top_k = 2, 8, 16, 16, 4
    x = normal(306, (batch, seq, d_model))
    w = normal(307, (num_experts, d_model), scale=d_model**-0.5)
    bias = normal(308, (num_experts,), scale=0.05)

    def router(x, w, bias):
        flat = x.reshape(-1, d_model)
        logits = jnp.sum(flat[:, None, :] * w[None, :, :], axis=-1).reshape(batch, seq, num_experts)
        scores = jax.nn.sigmoid(logits)
        ids = lax.top_k(scores + bias, top_k)[1]
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        return weights / (weights.sum(-1, keepdims=True) + 1e-20) * 2.5, ids

    return ZooCase(
        "f3_reduce_sum_logits",
        router,
        (x, w, bias),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, scale=2.5, selection_bias=True),
        note="logits as a broadcast product summed over D (reduce_sum), reshaped back to [B, S, E]",
    )


def make_f1_logsumexp_softmax_l1_renorm() -> ZooCase:
    """Softmax spelled exp(x - logsumexp(x)), top-2, renormalised by the L1 norm (DBRX's p-norm, p=1)."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 16, 2
    x = normal(317, (num_tokens, d_model))
    w = normal(318, (d_model, num_experts), scale=d_model**-0.5)

    def router(x, w):
        logits = x @ w
        probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        weights, ids = lax.top_k(probs, top_k)
        return weights / jnp.linalg.norm(weights, ord=1, axis=-1, keepdims=True), ids

    return ZooCase(
        "f1_logsumexp_softmax_l1_renorm",
        router,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="exp(x - jax.nn.logsumexp(x)); weights / jnp.linalg.norm(weights, ord=1)",
    )


def make_f1_score_computed_twice() -> ZooCase:
    """The softmax computed twice from the same logits: once to select, once to read the weights."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 16, 4
    x = normal(319, (num_tokens, d_model))
    w = normal(320, (d_model, num_experts), scale=d_model**-0.5)

    def router(x, w):
        _, ids = lax.top_k(jax.nn.softmax(x @ w, axis=-1), top_k)
        weights = jnp.take_along_axis(jax.nn.softmax(x @ w, axis=-1), ids, axis=-1)
        return weights / weights.sum(-1, keepdims=True), ids

    return ZooCase(
        "f1_score_computed_twice",
        router,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="two equal softmax computations (selection and gather): one value",
    )


def make_f1_argsort_ties() -> ZooCase:
    """Top-k spelled argsort(-p)[:, :k] (a stable sort), weights read with take_along_axis; tied experts."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(324, (num_tokens, d_model))
    w = duplicate(normal(325, (d_model, num_experts // 2), scale=d_model**-0.5), axis=1)

    def router(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        ids = jnp.argsort(-probs, axis=-1)[:, :top_k]
        weights = jnp.take_along_axis(probs, ids, axis=-1)
        return weights / weights.sum(-1, keepdims=True), ids

    return ZooCase(
        "f1_argsort_ties",
        router,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="exact ties (e, e+4): the stable sort keeps the lower id first, as lax.top_k does",
    )


def make_f1_argsort_descending_ties() -> ZooCase:
    """Top-k spelled argsort(p, descending=True)[:, :k]; tied experts, weights by take_along_axis."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(326, (num_tokens, d_model))
    w = duplicate(normal(327, (d_model, num_experts // 2), scale=d_model**-0.5), axis=1)

    def router(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        ids = jnp.argsort(probs, axis=-1, descending=True)[:, :top_k]
        weights = jnp.take_along_axis(probs, ids, axis=-1)
        return weights / weights.sum(-1, keepdims=True), ids

    return ZooCase(
        "f1_argsort_descending_ties",
        router,
        (x, w),
        "F1",
        router_expect(top_k, num_experts, "softmax", renorm=True),
        note="exact ties (e, e+4): jnp's descending argsort keeps the lower id first, as lax.top_k does",
    )


# ---------------------------------------------------------------------------------------------
# F2: top-k on raw logits -> softmax over the k values
# ---------------------------------------------------------------------------------------------


def make_f2_gpt_oss() -> ZooCase:
    """GPT-OSS: router Linear with bias (bf16), top-4 of 32 on logits, softmax over the 4 in f32."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    x = normal(30, (num_tokens, d_model), BF16)
    router_w = normal(31, (d_model, num_experts), BF16, scale=d_model**-0.5)
    router_b = normal(32, (num_experts,), BF16, scale=0.1)

    def gpt_oss_router(x, router_w, router_b):
        router_logits = x @ router_w + router_b
        router_top_value, router_indices = jax.lax.top_k(router_logits, top_k)
        router_top_value = jax.nn.softmax(router_top_value.astype(jnp.float32), axis=1)
        return router_top_value, router_indices

    return ZooCase(
        "f2_gpt_oss",
        gpt_oss_router,
        (x, router_w, router_b),
        "F2",
        router_expect(top_k, num_experts, "softmax", "topk_then_score"),
        note="router (logit) bias [E]; bf16 logits; softmax(axis=1) over the k values in f32",
    )


def make_f2_manual_softmax_lax() -> ZooCase:
    """lax-heavy: dot_general, top_k, hand-written softmax using v[:, :1] as the max."""
    num_tokens, d_model, num_experts, top_k = 32, 32, 8, 2
    x = normal(33, (num_tokens, d_model))
    w = normal(34, (d_model, num_experts), scale=d_model**-0.5)

    def router(x, w):
        logits = lax.dot_general(x, w, dimension_numbers=(((1,), (0,)), ((), ())))
        vals, idx = lax.top_k(logits, top_k)
        ex = lax.exp(vals - vals[:, :1])  # top_k is sorted: column 0 is the max
        gates = ex / lax.broadcast_in_dim(jnp.sum(ex, axis=1), ex.shape, (0,))
        return gates, idx

    return ZooCase(
        "f2_manual_softmax_lax",
        router,
        (x, w),
        "F2",
        router_expect(top_k, num_experts, "softmax", "topk_then_score"),
        note="softmax spelled with lax.exp / sum / broadcast_in_dim, max taken as vals[:, :1]",
    )


@functools.partial(jax.jit, static_argnames=("k",))
def _route_topk_softmax(logits, k):
    top_logits, top_ids = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top_logits, axis=-1), top_ids


def make_f2_jit_helper() -> ZooCase:
    """Routing in a @jax.jit-decorated helper (static k) called from the model; [B,S,D]."""
    batch, seq, d_model, num_experts, top_k = 2, 16, 32, 16, 2
    x = normal(35, (batch, seq, d_model))
    w = normal(36, (d_model, num_experts), scale=d_model**-0.5)

    def model(x, w):
        logits = jnp.einsum("bsd,de->bse", x, w)
        return _route_topk_softmax(logits, top_k)

    return ZooCase(
        "f2_jit_helper",
        model,
        (x, w),
        "F2",
        router_expect(top_k, num_experts, "softmax", "topk_then_score"),
        note="matmul in the caller, top_k+softmax inside a nested jax.jit (pjit) with static k",
    )


def make_f2_remat_layers() -> ZooCase:
    """Two unrolled layers, each wrapped in jax.checkpoint; top-k then softmax routing."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(37, (num_tokens, d_model))
    gates = [normal(38 + i, (d_model, num_experts), scale=d_model**-0.5) for i in range(2)]
    experts = [_dense_experts(50 + i, num_experts, d_model) for i in range(2)]

    @jax.checkpoint
    def block(h, gate, expert_w):
        logits = h @ gate
        top_logits, top_ids = lax.top_k(logits, top_k)
        probs = jax.nn.softmax(top_logits, axis=-1)
        mask = jax.nn.one_hot(top_ids, num_experts, dtype=h.dtype)  # [T, k, E]
        dispatch = jnp.einsum("tk,tke->te", probs, mask)
        ys = jnp.einsum("td,edf->tef", h, expert_w)
        return h + jnp.einsum("te,tef->tf", dispatch, ys)

    def model(x, gates, experts):
        h = x
        for g, ew in zip(gates, experts, strict=True):
            h = block(h, g, ew)
        return h

    return ZooCase(
        "f2_remat_layers",
        model,
        (x, gates, experts),
        "F2",
        router_expect(top_k, num_experts, "softmax", "topk_then_score"),
        count=2,
        note="jax.checkpoint (remat) around each of 2 layers; one_hot dispatch",
    )


def make_f2_ties() -> ZooCase:
    """Top-4 of 16 on raw logits where columns 8..15 duplicate 0..7 (exact logit ties)."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 16, 4
    x = normal(52, (num_tokens, d_model))
    half = normal(53, (d_model, num_experts // 2), scale=d_model**-0.5)
    w = duplicate(half, axis=-1)

    def router(x, w):
        logits = jnp.matmul(x, w)
        v, i = lax.top_k(logits, top_k)
        return jax.nn.softmax(v, axis=-1), i.astype(jnp.int32)

    return ZooCase(
        "f2_ties",
        router,
        (x, w),
        "F2",
        router_expect(top_k, num_experts, "softmax", "topk_then_score"),
        note="exact ties: pairs (e, e+8) identical; redundant astype(int32) on ids",
    )


# ---------------------------------------------------------------------------------------------
# F3: sigmoid + selection-only bias, gather unbiased, renorm, routed scaling (no groups)
# ---------------------------------------------------------------------------------------------


class _DeepseekV3TopkRouterNoGroupPort:
    """HF DeepseekV3TopkRouter port with the group code deleted (n_group == 1 checkpoints)."""

    def __init__(self, weight, e_score_correction_bias, top_k, routed_scaling_factor):
        self.weight = weight  # [n_routed_experts, hidden_size], torch layout
        self.e_score_correction_bias = e_score_correction_bias
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = True

    def __call__(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = hidden_states.astype(jnp.float32) @ self.weight.astype(jnp.float32).T
        scores = jax.nn.sigmoid(router_logits)
        scores_for_choice = scores + self.e_score_correction_bias[None, :]
        topk_indices = jax.lax.top_k(scores_for_choice, self.top_k)[1]
        topk_weights = jnp.take_along_axis(scores, topk_indices, axis=1)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(axis=-1, keepdims=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return topk_indices, topk_weights


def make_f3_dsv3_hf_port() -> ZooCase:
    """DeepSeek-V3 style without groups: sigmoid, +bias for choice, gather unbiased, renorm(+1e-20), *2.5."""
    batch, seq, d_model, num_experts, top_k = 2, 8, 32, 64, 6
    hidden = normal(54, (batch, seq, d_model), BF16)
    weight = normal(55, (num_experts, d_model), BF16, scale=d_model**-0.5)
    bias = normal(56, (num_experts,), scale=0.05)

    def run(weight, bias, hidden):
        router = _DeepseekV3TopkRouterNoGroupPort(weight, bias, top_k, 2.5)
        topk_indices, topk_weights = router(hidden)
        return topk_weights, topk_indices

    return ZooCase(
        "f3_dsv3_hf_port",
        run,
        (weight, bias, hidden),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, scale=2.5, selection_bias=True),
        note="bf16 [B,S,D] -> f32 logits with W[E,D].T; take_along_axis gather; /= (sum + 1e-20)",
    )


def make_f3_single_group_degenerate() -> ZooCase:
    """Full DS-V3 group code path but with n_group=1, topk_group=1: the group mask keeps everything."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    n_group, topk_group = 1, 1
    x = normal(57, (num_tokens, d_model))
    w = normal(58, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(59, (num_experts,), scale=0.05)

    def router(x, w, bias):
        scores = jax.nn.sigmoid(x @ w)
        s = scores + bias
        group_scores = lax.top_k(s.reshape(num_tokens, n_group, -1), 2)[0].sum(-1)
        group_idx = lax.top_k(group_scores, topk_group)[1]
        group_mask = jnp.zeros_like(group_scores).at[jnp.arange(num_tokens)[:, None], group_idx].set(1.0)
        score_mask = jnp.broadcast_to(group_mask[:, :, None], (num_tokens, n_group, num_experts // n_group))
        s = jnp.where(score_mask.reshape(num_tokens, -1) > 0, s, 0.0)
        ids = lax.top_k(s, top_k)[1]
        wts = jnp.take_along_axis(scores, ids, axis=-1)
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
        return wts * 2.827, ids

    return ZooCase(
        "f3_single_group_degenerate",
        router,
        (x, w, bias),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, scale=2.827, selection_bias=True),
        note="Kimi-K2-like config (n_group=1) run through the group-limited code; mask is all ones",
    )


def make_f3_lax_advanced_indexing() -> ZooCase:
    """Sigmoid router; unbiased weights gathered with scores[rows, ids]; renorm; no scaling."""
    num_tokens, d_model, num_experts, top_k = 24, 32, 16, 2
    x = normal(60, (num_tokens, d_model))
    w = normal(61, (d_model, num_experts), scale=d_model**-0.5)
    correction = normal(62, (num_experts,), scale=0.1)

    def router(x, w, correction):
        logits = lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        affinity = lax.logistic(logits)
        _, chosen = lax.top_k(affinity + correction[None, :], top_k)
        rows = jnp.arange(affinity.shape[0])[:, None]
        gate = affinity[rows, chosen]
        gate = gate / (jnp.sum(gate, axis=-1, keepdims=True) + 1e-20)
        return gate, chosen

    return ZooCase(
        "f3_lax_advanced_indexing",
        router,
        (x, w, correction),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, selection_bias=True),
        note="lax.logistic; gather via numpy advanced indexing; scale None",
    )


def make_f3_dict_bf16_onehot() -> ZooCase:
    """Dict params, bf16 [B,S,D], jnp.matmul(preferred_element_type=f32), one_hot gather, *2.5."""
    batch, seq, d_model, num_experts, top_k = 2, 8, 32, 32, 4
    x = normal(63, (batch, seq, d_model), BF16)
    params = {
        "gate": {"w": normal(64, (d_model, num_experts), BF16, scale=d_model**-0.5)},
        "expert_bias": normal(65, (num_experts,), scale=0.05),
    }

    def router(params, x):
        logits = jnp.matmul(x, params["gate"]["w"], preferred_element_type=jnp.float32)
        probs = jax.nn.sigmoid(logits)
        biased = probs + params["expert_bias"]
        _, expert_idx = jax.lax.top_k(biased, top_k)
        onehot = jax.nn.one_hot(expert_idx, num_experts, dtype=probs.dtype)  # [B, S, k, E]
        gates = jnp.sum(onehot * probs[..., None, :], axis=-1)
        gates = gates / (gates.sum(axis=-1, keepdims=True) + 1e-20)
        gates = gates * 2.5
        return gates, expert_idx

    return ZooCase(
        "f3_dict_bf16_onehot",
        router,
        (params, x),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, scale=2.5, selection_bias=True),
        note="gather of unbiased scores via one_hot * probs summed over E",
    )


class _ScoreCorrection(nnx.Variable):
    """Non-trainable buffer, like torch register_buffer."""


class _NnxSigmoidRouter(nnx.Module):
    def __init__(self, d_model, num_experts, top_k, scaling, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(d_model**-0.5)
        self.kernel = nnx.Param(init(rngs.params(), (d_model, num_experts)))
        self.e_score_correction_bias = _ScoreCorrection(
            0.05 * jax.random.normal(rngs.params(), (num_experts,))
        )
        self.top_k = top_k
        self.scaling = scaling

    def __call__(self, x):
        scores = nnx.sigmoid(x @ self.kernel[...])
        _, idx = jax.lax.top_k(scores + self.e_score_correction_bias[...], self.top_k)
        w = jnp.take_along_axis(scores, idx, axis=-1)
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        return w * self.scaling, idx


def make_f3_nnx_split_merge() -> ZooCase:
    """NNX module (nnx.Param kernel + custom nnx.Variable bias) run through nnx.split / nnx.merge."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    module = _NnxSigmoidRouter(d_model, num_experts, top_k, 1.8, rngs=nnx.Rngs(66))
    graphdef, state = nnx.split(module)
    x = normal(67, (num_tokens, d_model))

    def fn(state, x):
        router = nnx.merge(graphdef, state)
        return router(x)

    return ZooCase(
        "f3_nnx_split_merge",
        fn,
        (state, x),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, scale=1.8, selection_bias=True),
        note="params arrive as an nnx.State pytree argument",
    )


def make_f3_ties() -> ZooCase:
    """Sigmoid + selection bias where experts e and e+8 have identical logits AND identical bias."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 16, 4
    x = normal(68, (num_tokens, d_model))
    half = normal(69, (d_model, num_experts // 2), scale=d_model**-0.5)
    w = duplicate(half, axis=1)
    hb = normal(70, (num_experts // 2,), scale=0.05)
    bias = duplicate(hb)

    def router(x, w, bias):
        s = jax.nn.sigmoid(x @ w)
        ids = lax.top_k(s + bias, top_k)[1]
        g = jnp.take_along_axis(s, ids, axis=-1)
        return 2.5 * g / (g.sum(-1, keepdims=True) + 1e-20), ids

    return ZooCase(
        "f3_ties",
        router,
        (x, w, bias),
        "F3",
        router_expect(top_k, num_experts, "sigmoid", renorm=True, scale=2.5, selection_bias=True),
        note="exact ties in biased scores: pairs (e, e+8)",
    )


# ---------------------------------------------------------------------------------------------
# F4: group-limited selection
# ---------------------------------------------------------------------------------------------


class _LingMoeGatePort:
    """HF-port of a DeepSeek-V3 / Ling-2.6 noaux_tc gate (torch-like code, jnp ops)."""

    def __init__(self, weight, e_score_correction_bias):
        self.weight = weight  # [n_routed_experts, hidden_size]
        self.e_score_correction_bias = e_score_correction_bias
        self.n_routed_experts = weight.shape[0]
        self.top_k = 8
        self.n_group = 8
        self.topk_group = 4
        self.routed_scaling_factor = 2.5
        self.norm_topk_prob = True

    def get_topk_indices(self, scores):
        scores_for_choice = scores.reshape(-1, self.n_routed_experts) + self.e_score_correction_bias[None, :]
        group_scores = (
            jax.lax.top_k(
                scores_for_choice.reshape(-1, self.n_group, self.n_routed_experts // self.n_group), 2
            )[0]
        ).sum(axis=-1)
        group_idx = jax.lax.top_k(group_scores, self.topk_group)[1]
        group_mask = jnp.zeros_like(group_scores)
        group_mask = group_mask.at[jnp.arange(group_mask.shape[0])[:, None], group_idx].set(1)  # scatter_
        score_mask = jnp.broadcast_to(
            group_mask[:, :, None],
            (group_mask.shape[0], self.n_group, self.n_routed_experts // self.n_group),
        ).reshape(-1, self.n_routed_experts)
        scores_for_choice = jnp.where(~score_mask.astype(bool), 0.0, scores_for_choice)  # masked_fill
        topk_indices = jax.lax.top_k(scores_for_choice, self.top_k)[1]
        return topk_indices

    def __call__(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = jnp.matmul(hidden_states.astype(jnp.float32), self.weight.astype(jnp.float32).T)
        scores = jax.nn.sigmoid(router_logits)
        topk_indices = self.get_topk_indices(scores)
        topk_weights = jnp.take_along_axis(scores, topk_indices, axis=1)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(axis=-1, keepdims=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return topk_indices, topk_weights


def make_f4_ling_hf_port() -> ZooCase:
    """Ling-2.6 config: 256 experts, top-8, 8 groups, keep 4, top-2-sum group score, sigmoid, *2.5."""
    batch, seq, d_model, num_experts = 2, 8, 32, 256
    hidden = normal(71, (batch, seq, d_model), BF16)
    weight = normal(72, (num_experts, d_model), BF16, scale=d_model**-0.5)
    bias = normal(73, (num_experts,), scale=0.02, offset=0.05)

    def run(weight, bias, hidden):
        idx, w = _LingMoeGatePort(weight, bias)(hidden)
        return w, idx

    return ZooCase(
        "f4_ling_hf_port",
        run,
        (weight, bias, hidden),
        "F4",
        router_expect(
            8, num_experts, "sigmoid", n_group=8, topk_group=4, renorm=True, scale=2.5, selection_bias=True
        ),
        note="group score top2_sum; scatter group mask (.at[].set); masked_fill 0.0; W[E,D].T",
    )


def make_f4_dsv3_jnp_onehot() -> ZooCase:
    """DS-V3 group-limited routing on [B,S,D] kept 3-D; one_hot group mask, jnp.repeat, -inf mask."""
    batch, seq, d_model, num_experts, top_k = 2, 8, 32, 64, 6
    n_group, topk_group = 8, 4
    x = normal(74, (batch, seq, d_model))
    w = normal(75, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(76, (num_experts,), scale=0.05)

    def router(x, w, bias):
        b, s, _ = x.shape
        scores = jax.nn.sigmoid(jnp.einsum("bsd,de->bse", x, w))
        choice = scores + bias
        grouped = choice.reshape(b, s, n_group, num_experts // n_group)
        top2, _ = lax.top_k(grouped, 2)
        group_scores = jnp.sum(top2, axis=-1)  # [B, S, G]
        _, group_idx = lax.top_k(group_scores, topk_group)
        group_mask = jax.nn.one_hot(group_idx, n_group).sum(axis=-2)  # [B, S, G]
        expert_mask = jnp.repeat(group_mask, num_experts // n_group, axis=-1)  # [B, S, E]
        choice = jnp.where(expert_mask > 0, choice, -jnp.inf)
        _, ids = lax.top_k(choice, top_k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20) * 2.5
        return weights, ids

    return ZooCase(
        "f4_dsv3_jnp_onehot",
        router,
        (x, w, bias),
        "F4",
        router_expect(
            top_k,
            num_experts,
            "sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            renorm=True,
            scale=2.5,
            selection_bias=True,
        ),
        note="group score top2_sum; masked with -inf; one_hot(...).sum + jnp.repeat mask",
    )


def make_f4_group_mask_per_group_layout() -> ZooCase:
    """DS-V3 routing masked in the [T, G, E/G] layout: where(flags[:, :, None], grouped, -inf) then
    flattened back to [T, E]; the flags are `not` of a zero count, so the select picks -inf first."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    n_group, topk_group = 8, 3
    x = normal(79, (num_tokens, d_model))
    w = normal(80, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(81, (num_experts,), scale=0.05)

    def router(x, w, bias):
        scores = jax.nn.sigmoid(x @ w)
        grouped = (scores + bias).reshape(num_tokens, n_group, -1)
        group_scores = lax.top_k(grouped, 2)[0].sum(-1)
        picked = jnp.zeros((num_tokens, n_group), jnp.int32)
        picked = picked.at[jnp.arange(num_tokens)[:, None], lax.top_k(group_scores, topk_group)[1]].add(1)
        dropped = (picked == 0)[:, :, None]
        choice = jnp.where(dropped, -jnp.inf, grouped).reshape(num_tokens, num_experts)
        ids = lax.top_k(choice, top_k)[1]
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        return weights / (weights.sum(-1, keepdims=True) + 1e-20), ids

    return ZooCase(
        "f4_group_mask_per_group_layout",
        router,
        (x, w, bias),
        "F4",
        router_expect(
            top_k,
            num_experts,
            "sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            renorm=True,
            selection_bias=True,
        ),
        note="group mask applied per group ([T, G, 1] flags, == 0 sense) before the flattening reshape",
    )


def make_f1_rank_all_of_fewer_logits() -> ZooCase:
    """top-2 of 2 softmax scores whose ids pick expert weights out of 8: every candidate is kept, but
    the ids still choose which 2 of the 8 experts run (a gate with fewer outputs than experts)."""
    num_tokens, d_model, num_experts, num_logits = 16, 32, 8, 2
    x = normal(82, (num_tokens, d_model))
    w = normal(83, (d_model, num_logits), scale=d_model**-0.5)
    experts = normal(84, (num_experts, d_model, d_model), scale=d_model**-0.5)

    def router(x, w, experts):
        vals, ids = lax.top_k(jax.nn.softmax(x @ w, axis=-1), num_logits)
        rows = jnp.einsum("td,tkde->tke", x, experts[ids])
        return jnp.einsum("tke,tk->te", rows, vals), ids

    return ZooCase(
        "f1_rank_all_of_fewer_logits",
        router,
        (x, w, experts),
        "F1",
        router_expect(num_logits, num_logits, "softmax"),
        note="k equal to the number of logits; the ids gather from 8 expert weights",
    )


def make_f4_dsv2_group_limited_greedy() -> ZooCase:
    """DeepSeek-V2 'group_limited_greedy': softmax scores, group score = max, mask 0.0, no renorm, *16."""
    num_tokens, d_model, num_experts, top_k = 24, 32, 64, 6
    n_group, topk_group = 8, 3
    x = normal(77, (num_tokens, d_model))
    w = normal(78, (d_model, num_experts), scale=d_model**-0.5)

    def moe_gate(x, w):
        logits = x @ w
        scores = jax.nn.softmax(logits, axis=-1)
        group_scores = scores.reshape(num_tokens, n_group, -1).max(axis=-1)  # [T, n_group]
        group_idx = lax.top_k(group_scores, topk_group)[1]
        group_mask = jnp.zeros_like(group_scores).at[jnp.arange(num_tokens)[:, None], group_idx].set(1)
        score_mask = jnp.broadcast_to(
            group_mask[:, :, None], (num_tokens, n_group, num_experts // n_group)
        ).reshape(num_tokens, -1)
        tmp_scores = jnp.where(score_mask.astype(bool), scores, 0.0)
        topk_weight, topk_idx = lax.top_k(tmp_scores, top_k)
        topk_weight = topk_weight * 16.0
        return topk_weight, topk_idx

    return ZooCase(
        "f4_dsv2_group_limited_greedy",
        moe_gate,
        (x, w),
        "F4",
        router_expect(top_k, num_experts, "softmax", n_group=n_group, topk_group=topk_group, scale=16.0),
        note="group score = MAX (not top2_sum); weights are the masked top-k values themselves; no bias",
    )


def make_f4_scan_groups() -> ZooCase:
    """Group-limited sigmoid router inside lax.scan over 2 layers with stacked gate [L,D,E] and bias [L,E]."""
    num_layers, num_tokens, d_model, num_experts, top_k = 2, 16, 32, 32, 4
    n_group, topk_group = 4, 2
    x = normal(79, (num_tokens, d_model))
    gates = normal(80, (num_layers, d_model, num_experts), scale=d_model**-0.5)
    biases = normal(81, (num_layers, num_experts), scale=0.05)
    experts = _dense_experts(82, num_experts, d_model, layers=num_layers)

    def body(h, xs):
        gate_w, bias, expert_w = xs
        logits = lax.dot_general(h, gate_w, (((1,), (0,)), ((), ())))
        scores = lax.logistic(logits)
        sel = scores + bias
        g = lax.top_k(sel.reshape(num_tokens, n_group, num_experts // n_group), 2)[0]
        g = g[..., 0] + g[..., 1]
        _, gidx = lax.top_k(g, topk_group)
        keep = jnp.any(gidx[:, :, None] == jnp.arange(n_group)[None, None, :], axis=1)  # [T, G]
        keep = jnp.broadcast_to(keep[:, :, None], (num_tokens, n_group, num_experts // n_group))
        sel = jnp.where(keep.reshape(num_tokens, num_experts), sel, 0.0)
        _, ids = lax.top_k(sel, top_k)
        wts = jnp.take_along_axis(scores, ids, axis=1)
        wts = 2.5 * wts / (jnp.sum(wts, axis=1, keepdims=True) + 1e-20)
        y = jnp.einsum("td,edf->tef", h, expert_w)
        y = jnp.take_along_axis(y, ids[..., None], axis=1)
        return h + jnp.einsum("tk,tkf->tf", wts, y), None

    def model(x, gates, biases, experts):
        h, _ = lax.scan(body, x, (gates, biases, experts))
        return h

    return ZooCase(
        "f4_scan_groups",
        model,
        (x, gates, biases, experts),
        "F4",
        router_expect(
            top_k,
            num_experts,
            "sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            renorm=True,
            scale=2.5,
            selection_bias=True,
        ),
        count=1,
        note="scan body router; group top2_sum as g[...,0]+g[...,1]; group mask via == arange + any",
    )


def make_f4_ties_duplicated_groups() -> ZooCase:
    """Group 2 duplicates group 0 and group 3 duplicates group 1 (tied groups and tied experts)."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    n_group, topk_group = 4, 2
    x = normal(83, (num_tokens, d_model), BF16)
    half = normal(84, (d_model, num_experts // 2), scale=d_model**-0.5)
    w = duplicate(half, axis=1)
    hb = np.full((num_experts // 2,), 0.05, np.float32)
    bias = duplicate(hb)

    @jax.checkpoint
    def router(x, w, bias):
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ w)
        sc = scores + bias
        gs = lax.top_k(sc.reshape(-1, n_group, num_experts // n_group), 2)[0].sum(-1)
        gi = lax.top_k(gs, topk_group)[1]
        gm = jax.nn.one_hot(gi, n_group, dtype=jnp.bool_).any(axis=1)
        em = jnp.repeat(gm, num_experts // n_group, axis=1)
        sc = jnp.where(em, sc, float("-inf"))
        ids = lax.top_k(sc, top_k)[1]
        wt = jnp.take_along_axis(scores, ids, axis=1)
        return wt / (wt.sum(axis=1, keepdims=True) + 1e-20), ids

    return ZooCase(
        "f4_ties_duplicated_groups",
        router,
        (x, w, bias),
        "F4",
        router_expect(
            top_k,
            num_experts,
            "sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            renorm=True,
            selection_bias=True,
        ),
        note="exact group and expert ties; -inf mask; inside jax.checkpoint; bf16 x; no scaling",
    )


class _SglLingTopK(nnx.Module):
    """SGLang-JAX's Ling-2.6 `TopK` (gate logits in, grouped sigmoid routing out), as its upstream writes it:
    the group mask is clip(one_hot(group_idx).sum(1), 0, 1), a float array used directly as the `where`
    condition; with a correction bias the group score is the sum of each group's top-2 and dropped experts
    get -inf, without one it is the group max and they get 0.0."""

    def __init__(self, d_model, num_experts, top_k, n_group, topk_group, scaling, use_bias, *, rngs):
        self.gate = nnx.Linear(d_model, num_experts, use_bias=False, rngs=rngs)
        self.correction_bias = (
            nnx.Param(0.05 * jax.random.normal(rngs.params(), (num_experts,))) if use_bias else None
        )
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group, self.scaling = n_group, topk_group, scaling

    def __call__(self, hidden_states):
        router_logits = self.gate(hidden_states).astype(jnp.float32)
        num_tokens = router_logits.shape[0]
        scores = jax.nn.sigmoid(router_logits)
        if self.correction_bias is not None:
            scores_for_choice = scores + self.correction_bias[...][None, :]
            grouped = scores_for_choice.reshape(num_tokens, self.n_group, -1)
            group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
            fill = -jnp.inf
        else:
            scores_for_choice = scores
            group_scores = jnp.max(scores.reshape(num_tokens, self.n_group, -1), axis=-1)
            fill = 0.0
        group_idx = jax.lax.top_k(group_scores, self.topk_group)[1]
        group_mask = jnp.clip(jax.nn.one_hot(group_idx, self.n_group).sum(axis=1), 0, 1)
        score_mask = jnp.broadcast_to(
            group_mask[:, :, None], (num_tokens, self.n_group, self.num_experts // self.n_group)
        ).reshape(num_tokens, self.num_experts)
        masked_scores = jnp.where(score_mask, scores_for_choice, fill)
        topk_ids = jax.lax.top_k(masked_scores, self.top_k)[1]
        topk_weights = jnp.take_along_axis(scores, topk_ids, axis=1)
        topk_weights = topk_weights / jnp.sum(topk_weights, axis=-1, keepdims=True)
        return topk_weights * self.scaling, topk_ids


def _sgl_ling_case(name: str, use_bias: bool, seed: int) -> ZooCase:
    num_tokens, d_model, num_experts, top_k, n_group, topk_group = 16, 32, 64, 8, 8, 4
    module = _SglLingTopK(
        d_model, num_experts, top_k, n_group, topk_group, 2.5, use_bias, rngs=nnx.Rngs(seed)
    )
    graphdef, state = nnx.split(module)
    x = normal(seed + 1, (num_tokens, d_model))

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    return ZooCase(
        name,
        fn,
        (state, x),
        "F4",
        router_expect(
            top_k,
            num_experts,
            "sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            renorm=True,
            scale=2.5,
            selection_bias=use_bias,
        ),
        note="SGLang-JAX Ling-2.6 TopK: clip(one_hot.sum) float mask as the where condition"
        + ("; top2_sum, -inf fill" if use_bias else "; group max, 0.0 fill"),
    )


def make_f4_sgl_ling_topk_bias() -> ZooCase:
    """SGLang-JAX Ling-2.6 TopK with the correction bias (NNX, split/merge)."""
    return _sgl_ling_case("f4_sgl_ling_topk_bias", True, 310)


def make_f4_sgl_ling_topk_no_bias() -> ZooCase:
    """SGLang-JAX Ling-2.6 TopK without a correction bias: group max, masked fill 0.0."""
    return _sgl_ling_case("f4_sgl_ling_topk_no_bias", False, 312)


def make_f4_top2_as_max_plus_runner_up() -> ZooCase:
    """DeepSeek group routing with the group's top-2 sum spelled max + max of the rest (first argmax
    masked with -inf), batch of 1 kept as a dim (take_along_axis then leaves it out of the batching)."""
    batch, seq, d_model, num_experts, top_k, n_group, topk_group = 1, 32, 32, 16, 4, 4, 2
    x = normal(314, (batch, seq, d_model))
    w = normal(315, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(316, (num_experts,), scale=0.05)

    def router(x, w, bias):
        scores = jax.nn.sigmoid(jnp.einsum("bsd,de->bse", x, w))
        choice = scores + bias
        grouped = choice.reshape(batch, seq, n_group, -1)
        first = jnp.max(grouped, axis=-1)
        at_first = jnp.arange(grouped.shape[-1]) == jnp.argmax(grouped, axis=-1)[..., None]
        runner_up = jnp.max(jnp.where(at_first, -jnp.inf, grouped), axis=-1)
        _, group_idx = lax.top_k(first + runner_up, topk_group)
        group_mask = jax.nn.one_hot(group_idx, n_group).sum(axis=-2)
        expert_mask = jnp.broadcast_to(group_mask[..., None], grouped.shape).reshape(choice.shape)
        _, ids = lax.top_k(jnp.where(expert_mask > 0, choice, -jnp.inf), top_k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        return weights / (weights.sum(-1, keepdims=True) + 1e-20) * 2.5, ids

    return ZooCase(
        "f4_top2_as_max_plus_runner_up",
        router,
        (x, w, bias),
        "F4",
        router_expect(
            top_k,
            num_experts,
            "sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            renorm=True,
            scale=2.5,
            selection_bias=True,
        ),
        note="group score max + masked-argmax max (MaxText's spelling); -inf fill; [1, S, E] logits",
    )


# ---------------------------------------------------------------------------------------------
# F5: per-expert scale gathered by the chosen ids (Gemma 4), optional logit bias
# ---------------------------------------------------------------------------------------------


def make_f5_gemma4() -> ZooCase:
    """Gemma-4-like: RMS-normed input, root-size scaling, softmax, top-8, renorm, per-expert scale."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 64, 8
    x = normal(85, (num_tokens, d_model), BF16)
    params = {
        "scale": normal(86, (d_model,), scale=0.1, offset=1.0),
        "proj": normal(87, (d_model, num_experts), scale=d_model**-0.5),
        "per_expert_scale": normal(88, (num_experts,), scale=0.2, offset=1.0),
    }

    def router(params, x):
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
        normed = normed * params["scale"] * (d_model**-0.5)
        logits = normed @ params["proj"]
        probs = jax.nn.softmax(logits, axis=-1)
        top_w, top_i = jax.lax.top_k(probs, top_k)
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        top_w = top_w * params["per_expert_scale"][top_i]
        return top_w, top_i

    return ZooCase(
        "f5_gemma4",
        router,
        (params, x),
        "F5",
        router_expect(top_k, num_experts, "softmax", renorm=True, expert_scale=True),
        note="router input is RMS-normed & scaled x; per_expert_scale[ids] after renorm",
    )


def make_f5_bias_take_top1() -> ZooCase:
    """Router logit bias, softmax, top-1, weight * jnp.take(expert_scale, ids)."""
    num_tokens, d_model, num_experts = 32, 32, 16
    x = normal(89, (num_tokens, d_model))
    w = normal(90, (d_model, num_experts), scale=d_model**-0.5)
    b = normal(91, (num_experts,), scale=0.1)
    expert_scale = jnp.asarray(np.linspace(0.5, 1.5, num_experts, dtype=np.float32))

    def router(x, w, b, expert_scale):
        probs = jax.nn.softmax(x @ w + b, axis=-1)
        gate, idx = lax.top_k(probs, 1)
        gate = gate * jnp.take(expert_scale, idx)
        return gate, idx

    return ZooCase(
        "f5_bias_take_top1",
        router,
        (x, w, b, expert_scale),
        "F5",
        router_expect(1, num_experts, "softmax", expert_scale=True),
        note="logit bias [E]; top-1; jnp.take gather of the per-expert scale",
    )


class _NnxScaledTopkRouter(nnx.Module):
    def __init__(self, d_model, num_experts, top_k, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(d_model, num_experts, use_bias=True, rngs=rngs)
        self.per_expert_scale = nnx.Param(jnp.asarray(np.linspace(0.8, 1.2, num_experts, dtype=np.float32)))
        self.top_k = top_k

    def __call__(self, x):
        logits = self.proj(x)
        top_logits, top_ids = jax.lax.top_k(logits, self.top_k)
        weights = jax.nn.softmax(top_logits, axis=-1)
        return weights * self.per_expert_scale[...][top_ids], top_ids


def make_f5_nnx_topk_then_softmax() -> ZooCase:
    """NNX module: Linear with bias, top-k on logits, softmax over k, * per_expert_scale[ids]."""
    batch, seq, d_model, num_experts, top_k = 2, 8, 32, 8, 2
    module = _NnxScaledTopkRouter(d_model, num_experts, top_k, rngs=nnx.Rngs(92))
    x = normal(93, (batch, seq, d_model))

    @jax.jit
    def fn(x):
        return module(x)

    return ZooCase(
        "f5_nnx_topk_then_softmax",
        fn,
        (x,),
        "F5",
        router_expect(top_k, num_experts, "softmax", "topk_then_score", expert_scale=True),
        note="nnx.Linear(use_bias=True) closed over inside a jax.jit-decorated fn; [B,S,D]",
    )


def make_f5_sigmoid_expert_scale() -> ZooCase:
    """F3-style sigmoid router plus a per-expert scale applied via one_hot(ids) @ scale."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    x = normal(94, (num_tokens, d_model))
    w = normal(95, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(96, (num_experts,), scale=0.05)
    expert_scale = normal(97, (num_experts,), scale=0.1, offset=1.0)

    def router(x, w, bias, expert_scale):
        scores = jax.nn.sigmoid(x @ w)
        ids = lax.top_k(scores + bias, top_k)[1]
        wts = jnp.take_along_axis(scores, ids, axis=-1)
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20) * 2.5
        wts = wts * (jax.nn.one_hot(ids, num_experts) @ expert_scale)
        return wts, ids

    return ZooCase(
        "f5_sigmoid_expert_scale",
        router,
        (x, w, bias, expert_scale),
        "F5",
        router_expect(
            top_k, num_experts, "sigmoid", renorm=True, scale=2.5, selection_bias=True, expert_scale=True
        ),
        note="per-expert scale gathered with a one_hot matmul (a second dot in the router)",
    )


ALL_ROUTERS = [
    # F1
    make_f1_mixtral_plain,
    make_f1_switch_top1,
    make_f1_qwen3_hf_port,
    make_f1_deepseek_v2_greedy,
    make_f1_nnx_linear,
    make_f1_vmap_per_token,
    make_f1_ties_duplicated_columns,
    make_f1_bf16_dot_general,
    make_f1_scan_layers,
    make_f1_unrolled_4layer,
    make_f1_model_with_lm_head,
    make_f1_sharded_named_logits,
    make_f1_shard_map_logits,
    make_f1_shard_map_probs_clamped_renorm,
    make_f1_shard_map_probs_as_given,
    make_f1_remat_in_shard_map_sigmoid_as_given,
    make_f1_temperature_logits,
    make_f1_logsumexp_softmax_l1_renorm,
    make_f1_score_computed_twice,
    make_f1_argsort_ties,
    make_f1_argsort_descending_ties,
    # F2
    make_f2_gpt_oss,
    make_f2_manual_softmax_lax,
    make_f2_jit_helper,
    make_f2_remat_layers,
    make_f2_ties,
    # F3
    make_f3_dsv3_hf_port,
    make_f3_single_group_degenerate,
    make_f3_lax_advanced_indexing,
    make_f3_dict_bf16_onehot,
    make_f3_nnx_split_merge,
    make_f3_ties,
    make_f3_reduce_sum_logits,
    make_f3_hand_sigmoid_l1_renorm,
    # F4
    make_f4_ling_hf_port,
    make_f4_dsv3_jnp_onehot,
    make_f4_dsv2_group_limited_greedy,
    make_f1_rank_all_of_fewer_logits,
    make_f4_group_mask_per_group_layout,
    make_f4_scan_groups,
    make_f4_ties_duplicated_groups,
    make_f4_sgl_ling_topk_bias,
    make_f4_sgl_ling_topk_no_bias,
    make_f4_top2_as_max_plus_runner_up,
    # F5
    make_f5_gemma4,
    make_f5_bias_take_top1,
    make_f5_nnx_topk_then_softmax,
    make_f5_sigmoid_expert_scale,
]
