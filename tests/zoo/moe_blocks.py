"""Whole MoE blocks (router + experts + combine), as different real authors write them.

Every ``make_<name>()`` returns a :class:`MoECase` (a :class:`ZooCase` with family ``"MOE"``);
``case.fn(*case.args)`` returns the block output ([T, D] or [B, S, D]), or a tuple whose first
element is that output (the others are aux values: load-balancing loss, router z-loss ...).

``expect`` keys (exactly these, built by :func:`moe_expect`):

``k``              experts per token
``num_experts``    E (routed experts; a shared expert is not counted)
``activation``     "swiglu" | "geglu" | "gelu" | "relu" | "swiglu_oai" (GPT-OSS clamped swiglu)
``dispatch``       "dense" | "capacity" | "sorted" | "gather" | "loop" | "vmap"
``shared_expert``  bool, an always-on shared expert FFN added to the routed output
``capacity``       expert capacity C per token group (int) for "capacity" dispatch, else None

``count`` is the number of MoE blocks as traced (a ``lax.scan`` body counts once, unrolled
layers count each).  Things the keys do not capture (gelu exact vs tanh, expert biases, residual
added inside the program, capacity token order) are in ``note``.

``MoECase.ref`` describes the same computation in a canonical layout, for the zoo's own
self-check (``tests/zoo/test_moe_zoo_selfcheck.py`` recomputes every output with a per-token
loop in numpy).  It is *data*, not code::

    ref = {"x": [T, D] block input (tokens flattened), "residual": bool (out = x + moe(x) per block),
           "blocks": [block, ...]}                     # one per layer, applied in order
    block = {"router": router, "experts": ffn [E, ...], "shared": ffn [...] | None,
             "capacity": None | {"capacity": C, "groups": G, "order": "token_major" | "choice_major"},
             "weights_on_input": bool}    # True: out += ffn(w * x) (Llama4), else out += w * ffn(x)
    router = {"w": [D, E], "k", "score": "softmax" | "sigmoid", "order": "score_then_topk" |
              "topk_then_score" (a softmax over the k logits, or the sigmoid of each),
              "logit_bias": [E] | None, "selection_bias": [E] | None,
              "n_group", "topk_group", "group_score": "top2_sum" | "max", "renorm", "scale"}
    ffn = {"activation", "gate": [(E,) D, F] | None, "up": [(E,) D, F], "down": [(E,) F, D],
           "gate_b", "up_b", "down_b": biases or None, "gelu_approximate": bool,
           "limit", "alpha": GPT-OSS clamp / sigmoid slope, "sigmoid_gate": [D, 1] | None (shared)}

Capacity groups: the T tokens are split into G contiguous groups with C slots per expert each;
"token_major" fills slots token by token (all k choices of token t before token t+1, MaxText),
"choice_major" fills all first choices before any second choice (GShard / Switch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from . import ZooCase, normal

MOE = "MOE"
F32 = jnp.float32
BF16 = jnp.bfloat16

MOE_EXPECT_KEYS = frozenset({"k", "num_experts", "activation", "dispatch", "shared_expert", "capacity"})
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "swiglu_oai")
DISPATCHES = ("dense", "capacity", "sorted", "gather", "loop", "vmap")


@dataclass
class MoECase(ZooCase):
    """A :class:`ZooCase` plus ``ref``: the canonical description used by the zoo self-check."""

    ref: dict = field(default_factory=dict)


def moe_expect(
    k: int,
    num_experts: int,
    activation: str,
    dispatch: str,
    *,
    shared_expert: bool = False,
    capacity: int | None = None,
) -> dict:
    """Build an ``expect`` dict with exactly the documented keys."""
    assert activation in ACTIVATIONS and dispatch in DISPATCHES
    return {
        "k": k,
        "num_experts": num_experts,
        "activation": activation,
        "dispatch": dispatch,
        "shared_expert": shared_expert,
        "capacity": capacity,
    }


# ---------------------------------------------------------------------------------------------
# canonical reference descriptions (host side, used only by the self-check)
# ---------------------------------------------------------------------------------------------


def _router_ref(
    w,
    k,
    score="softmax",
    order="score_then_topk",
    *,
    logit_bias=None,
    selection_bias=None,
    n_group=1,
    topk_group=1,
    group_score="top2_sum",
    renorm=False,
    scale=None,
) -> dict:
    return {
        "w": w,
        "k": k,
        "score": score,
        "order": order,
        "logit_bias": logit_bias,
        "selection_bias": selection_bias,
        "n_group": n_group,
        "topk_group": topk_group,
        "group_score": group_score,
        "renorm": renorm,
        "scale": scale,
    }


def _ffn_ref(
    activation,
    up,
    down,
    gate=None,
    *,
    gate_b=None,
    up_b=None,
    down_b=None,
    gelu_approximate=True,
    limit=7.0,
    alpha=1.702,
    sigmoid_gate=None,
) -> dict:
    return {
        "activation": activation,
        "gate": gate,
        "up": up,
        "down": down,
        "gate_b": gate_b,
        "up_b": up_b,
        "down_b": down_b,
        "gelu_approximate": gelu_approximate,
        "limit": limit,
        "alpha": alpha,
        "sigmoid_gate": sigmoid_gate,
    }


def _block_ref(router, experts, shared=None, capacity=None, weights_on_input=False) -> dict:
    return {"router": router, "experts": experts, "shared": shared, "capacity": capacity,
            "weights_on_input": weights_on_input}


def _ref(x, blocks, residual=False) -> dict:
    x = jnp.asarray(x)
    return {"x": x.reshape(-1, x.shape[-1]), "blocks": list(blocks), "residual": residual}


def _t(a, *axes):
    """Host-side transpose for torch-layout weights (only used to build ``ref``)."""
    return jnp.asarray(np.transpose(np.asarray(a), axes))


def _remat_nothing_saveable(f):
    return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)


def _w(seed, shape, fan_in, dtype=None, gain=1.0):
    return normal(seed, shape, dtype, scale=gain * fan_in**-0.5)


# ---------------------------------------------------------------------------------------------
# 1. dense over all experts, combine by a [T, E] combine-weights matrix
# ---------------------------------------------------------------------------------------------


def make_dense_tpu_inference_onehot() -> MoECase:
    """tpu-inference style dense MoE: every expert on every token, one_hot-summed combine weights."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 2
    x = normal(1000, (num_tokens, d_model))
    router_w = _w(1001, (d_model, num_experts), d_model)
    w1 = _w(1002, (num_experts, d_model, d_ff), d_model)
    w3 = _w(1003, (num_experts, d_model, d_ff), d_model)
    w2 = _w(1004, (num_experts, d_ff, d_model), d_ff)

    def sparse_moe_dense(x, router_w, w1, w2, w3):
        router_logits = jnp.dot(x, router_w)
        routing_weights = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
        weights, indices = jax.lax.top_k(routing_weights, top_k)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        one_hot_indices = jax.nn.one_hot(indices, num_experts, dtype=weights.dtype)  # [T, K, E]
        full_weights = jnp.sum(one_hot_indices * weights[..., None], axis=1)  # [T, E]
        gating = jnp.einsum("TD,EDF->TEF", x, w1)
        up = jnp.einsum("TD,EDF->TEF", x, w3)
        fuse = jax.nn.silu(gating) * up
        expert_out = jnp.einsum("TEF,EFD->TED", fuse, w2)
        return jnp.einsum("TED,TE->TD", expert_out, full_weights)

    router = _router_ref(router_w, top_k, renorm=True)
    return MoECase(
        "dense_tpu_inference_onehot",
        sparse_moe_dense,
        (x, router_w, w1, w2, w3),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "dense"),
        note="einsum TD,EDF->TEF over all 8 experts; combine [T,E] = sum_k one_hot(ids)*w; f32",
        ref=_ref(x, [_block_ref(router, _ffn_ref("swiglu", w3, w2, w1))]),
    )


def make_dense_maxtext_bsd_bf16_scatter() -> MoECase:
    """MaxText dense_matmul (no capacity) on [B,S,D] bf16; combine weights scattered with .at[].set."""
    batch, seq, d_model, d_ff, num_experts, top_k = 2, 16, 32, 64, 16, 4
    inputs = normal(1010, (batch, seq, d_model), BF16)
    params = {
        "gate": {"kernel": _w(1011, (d_model, num_experts), d_model)},
        "wi_0": _w(1012, (num_experts, d_model, d_ff), d_model, BF16),
        "wi_1": _w(1013, (num_experts, d_model, d_ff), d_model, BF16),
        "wo": _w(1014, (num_experts, d_ff, d_model), d_ff, BF16),
    }

    def moe_block(params, inputs):
        b, s, _ = inputs.shape
        gate_logits = jnp.einsum("bsm,me->bse", inputs.astype(jnp.float32), params["gate"]["kernel"])
        probs = jax.nn.softmax(gate_logits, axis=-1)
        top_w, top_i = jax.lax.top_k(probs, top_k)  # norm_topk_prob=False: no renorm
        bi = jnp.arange(b)[:, None, None]
        si = jnp.arange(s)[None, :, None]
        combine = jnp.zeros((b, s, num_experts), jnp.float32).at[bi, si, top_i].set(top_w)
        layer_w0 = jnp.einsum("bsm,emh->bseh", inputs, params["wi_0"])
        layer_w1 = jnp.einsum("bsm,emh->bseh", inputs, params["wi_1"])
        layer_act = jax.nn.gelu(layer_w0) * layer_w1
        out = jnp.einsum("bseh,ehm->bsem", layer_act, params["wo"])
        return jnp.einsum("bsem,bse->bsm", out, combine.astype(inputs.dtype))

    router = _router_ref(params["gate"]["kernel"], top_k)
    experts = _ffn_ref("geglu", params["wi_1"], params["wo"], params["wi_0"], gelu_approximate=True)
    return MoECase(
        "dense_maxtext_bsd_bf16_scatter",
        moe_block,
        (params, inputs),
        MOE,
        moe_expect(top_k, num_experts, "geglu", "dense"),
        note="bf16 experts, f32 router, no renorm; gelu tanh-approx; combine [B,S,E] via .at[b,s,ids].set",
        ref=_ref(inputs, [_block_ref(router, experts)]),
    )


# ---------------------------------------------------------------------------------------------
# 2. capacity dispatch (GShard / Switch / MaxText), tokens over capacity dropped
# ---------------------------------------------------------------------------------------------


def _cumsum_exclusive(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def make_capacity_gshard_top2() -> MoECase:
    """GShard top-2 gating with groups [G,S,M]: argmax twice, exclusive cumsum positions, cf=1.0."""
    groups, group_size, d_model, d_ff, num_experts = 2, 16, 32, 64, 8
    capacity_factor = 1.0
    capacity = int(math.ceil(capacity_factor * 2 * group_size / num_experts))  # 4
    x = normal(1020, (groups, group_size, d_model))
    wg = _w(1021, (d_model, num_experts), d_model, gain=2.0)
    wi = _w(1022, (num_experts, d_model, d_ff), d_model)
    wo = _w(1023, (num_experts, d_ff, d_model), d_ff)

    def top2_gating(logits):
        raw_gates = jax.nn.softmax(logits, axis=-1)  # [G,S,E]
        index_1 = jnp.argmax(raw_gates, axis=-1)
        mask_1 = jax.nn.one_hot(index_1, num_experts, dtype=raw_gates.dtype)
        gate_1 = jnp.sum(raw_gates * mask_1, axis=-1)
        gates_without_top_1 = raw_gates * (1.0 - mask_1)
        index_2 = jnp.argmax(gates_without_top_1, axis=-1)
        mask_2 = jax.nn.one_hot(index_2, num_experts, dtype=raw_gates.dtype)
        gate_2 = jnp.sum(gates_without_top_1 * mask_2, axis=-1)
        denom = gate_1 + gate_2 + 1e-9
        gate_1 = gate_1 / denom
        gate_2 = gate_2 / denom
        # load-balancing aux loss
        density_1 = jnp.mean(mask_1, axis=1)
        density_1_proxy = jnp.mean(raw_gates, axis=1)
        aux_loss = jnp.mean(density_1_proxy * density_1) * float(num_experts * num_experts)
        # positions in expert buffers; all first choices are placed before second choices
        position_in_expert_1 = _cumsum_exclusive(mask_1, axis=1) * mask_1
        mask_1 = mask_1 * (position_in_expert_1 < capacity).astype(mask_1.dtype)
        mask_1_count = jnp.sum(mask_1, axis=1, keepdims=True)
        mask_1_flat = jnp.sum(mask_1, axis=-1)
        position_in_expert_1 = jnp.sum(position_in_expert_1, axis=-1)
        position_in_expert_2 = (_cumsum_exclusive(mask_2, axis=1) + mask_1_count) * mask_2
        mask_2 = mask_2 * (position_in_expert_2 < capacity).astype(mask_2.dtype)
        mask_2_flat = jnp.sum(mask_2, axis=-1)
        position_in_expert_2 = jnp.sum(position_in_expert_2, axis=-1)
        gate_1 = gate_1 * mask_1_flat
        gate_2 = gate_2 * mask_2_flat
        b = jax.nn.one_hot(position_in_expert_1.astype(jnp.int32), capacity, dtype=gate_1.dtype)
        combine_1 = gate_1[..., None, None] * mask_1[..., None] * b[..., None, :]
        b = jax.nn.one_hot(position_in_expert_2.astype(jnp.int32), capacity, dtype=gate_2.dtype)
        combine_2 = gate_2[..., None, None] * mask_2[..., None] * b[..., None, :]
        combine_tensor = combine_1 + combine_2  # [G,S,E,C]
        dispatch_mask = combine_tensor.astype(bool)
        return aux_loss, combine_tensor, dispatch_mask

    def gshard_moe(x, wg, wi, wo):
        logits = jnp.einsum("gsm,me->gse", x, wg)
        aux_loss, combine_tensor, dispatch_mask = top2_gating(logits)
        expert_inputs = jnp.einsum("gsec,gsm->egcm", dispatch_mask.astype(x.dtype), x)
        h = jax.nn.gelu(jnp.einsum("egcm,emh->egch", expert_inputs, wi), approximate=False)
        expert_outputs = jnp.einsum("egch,ehm->egcm", h, wo)
        outputs = jnp.einsum("gsec,egcm->gsm", combine_tensor, expert_outputs)
        return outputs, aux_loss

    router = _router_ref(wg, 2, renorm=True)
    cap = {"capacity": capacity, "groups": groups, "order": "choice_major"}
    return MoECase(
        "capacity_gshard_top2",
        gshard_moe,
        (x, wg, wi, wo),
        MOE,
        moe_expect(2, num_experts, "gelu", "capacity", capacity=capacity),
        note="top-2 via argmax twice (no random 2nd-expert drop); G=2 groups, C=4 per group, exact gelu; "
        "returns (out, aux_loss)",
        ref=_ref(x, [_block_ref(router, _ffn_ref("gelu", wi, wo, gelu_approximate=False), capacity=cap)]),
    )


def make_capacity_maxtext_token_major() -> MoECase:
    """MaxText dropping path: top-k on logits, softmax over k, cumsum over flattened [S*K] per row."""
    batch, seq, d_model, d_ff, num_experts, top_k = 2, 16, 32, 64, 8, 2
    capacity_factor = 1.0
    expert_capacity = int(seq * top_k / num_experts * capacity_factor)  # 4 per batch row
    inputs = normal(1030, (batch, seq, d_model))
    gate_kernel = _w(1031, (d_model, num_experts), d_model, gain=2.0)
    wi_0 = _w(1032, (num_experts, d_model, d_ff), d_model)
    wi_1 = _w(1033, (num_experts, d_model, d_ff), d_model)
    wo = _w(1034, (num_experts, d_ff, d_model), d_ff)

    def generate_masks(top_k_indices, softmax_probs):
        b, s, _ = top_k_indices.shape
        expert_mask = jax.nn.one_hot(top_k_indices, num_classes=num_experts, dtype=jnp.int32)  # [B,S,K,E]
        expert_mask_fused = jnp.reshape(expert_mask, (b, s * top_k, num_experts))
        expert_token_count_fused = jnp.cumsum(expert_mask_fused, axis=1)
        expert_token_count = jnp.reshape(expert_token_count_fused, (b, s, top_k, num_experts))
        expert_token_count = expert_token_count * expert_mask
        trunc_expert_mask = expert_mask * (expert_token_count <= expert_capacity).astype(jnp.int32)
        expert_token_position = jnp.sum(expert_token_count * trunc_expert_mask, axis=-1) - 1  # [B,S,K]
        combined_expert_mask = jnp.sum(trunc_expert_mask, axis=-1)  # [B,S,K]
        position = jnp.where(combined_expert_mask > 0, expert_token_position, expert_capacity)
        expert_token_position_in_capacity = jax.nn.one_hot(position, expert_capacity, dtype=jnp.int32)
        dispatch_mask = jnp.einsum("bske,bskc->bsec", trunc_expert_mask, expert_token_position_in_capacity)
        combine_mask = jnp.einsum(
            "bsk,bske,bskc->bsec",
            softmax_probs,
            trunc_expert_mask.astype(softmax_probs.dtype),
            expert_token_position_in_capacity.astype(softmax_probs.dtype),
        )
        return dispatch_mask, combine_mask

    def dense_matmul(inputs, gate_kernel, wi_0, wi_1, wo):
        gate_logits = jnp.einsum("bsm,me->bse", inputs, gate_kernel)
        top_k_weights, top_k_indices = jax.lax.top_k(gate_logits, top_k)
        softmax_probs = jax.nn.softmax(top_k_weights.astype(jnp.float32), axis=-1)
        dispatch_mask, combine_mask = generate_masks(top_k_indices, softmax_probs)
        dispatch = jnp.einsum("bsm,bsec->ebcm", inputs, dispatch_mask.astype(inputs.dtype))
        layer_w0 = jnp.einsum("ebcm,emh->ebch", dispatch, wi_0)
        layer_w1 = jnp.einsum("ebcm,emh->ebch", dispatch, wi_1)
        intermediate = jax.nn.silu(layer_w0) * layer_w1
        expert_out = jnp.einsum("ebch,ehm->ebcm", intermediate, wo)
        return jnp.einsum("ebcm,bsec->bsm", expert_out, combine_mask)

    router = _router_ref(gate_kernel, top_k, order="topk_then_score")
    cap = {"capacity": expert_capacity, "groups": batch, "order": "token_major"}
    return MoECase(
        "capacity_maxtext_token_major",
        dense_matmul,
        (inputs, gate_kernel, wi_0, wi_1, wo),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "capacity", capacity=expert_capacity),
        note="Mixtral-style topk-then-softmax; capacity per batch row (C=4), token-major cumsum; "
        "dropped choices keep no renorm",
        ref=_ref(inputs, [_block_ref(router, _ffn_ref("swiglu", wi_1, wo, wi_0), capacity=cap)]),
    )


def make_capacity_switch_top1_bf16() -> MoECase:
    """Switch Transformer top-1 with capacity factor 1.0 over 64 tokens, bf16 experts, ReLU MLP."""
    num_tokens, d_model, d_ff, num_experts = 64, 32, 64, 16
    capacity = int(1.0 * num_tokens / num_experts)  # 4
    x = normal(1040, (num_tokens, d_model), BF16)
    router_kernel = _w(1041, (d_model, num_experts), d_model, gain=2.0)
    wi = _w(1042, (num_experts, d_model, d_ff), d_model, BF16)
    wo = _w(1043, (num_experts, d_ff, d_model), d_ff, BF16)

    def switch_layer(x, router_kernel, wi, wo):
        router_logits = x.astype(jnp.float32) @ router_kernel
        router_probs = jax.nn.softmax(router_logits, axis=-1)
        expert_gate, expert_index = jax.lax.top_k(router_probs, 1)
        expert_gate, expert_index = expert_gate[:, 0], expert_index[:, 0]
        expert_mask = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [T,E]
        token_priority = jnp.cumsum(expert_mask, axis=0) * expert_mask - 1  # [T,E], -1 if not routed
        expert_mask = expert_mask * (token_priority < capacity)
        dispatch = jax.nn.one_hot(token_priority, capacity, dtype=jnp.int32) * expert_mask[..., None]
        combine = dispatch.astype(jnp.float32) * expert_gate[:, None, None]  # [T,E,C]
        expert_inputs = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)
        h = jax.nn.relu(jnp.einsum("ecd,edf->ecf", expert_inputs, wi))
        expert_outputs = jnp.einsum("ecf,efd->ecd", h, wo)
        out = jnp.einsum("tec,ecd->td", combine.astype(x.dtype), expert_outputs)
        # auxiliary losses (returned, not part of the block output)
        density = jnp.mean(jax.nn.one_hot(expert_index, num_experts), axis=0)
        aux_loss = jnp.mean(density * jnp.mean(router_probs, axis=0)) * num_experts**2
        z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(router_logits, axis=-1)))
        return out, aux_loss, z_loss

    router = _router_ref(router_kernel, 1)
    cap = {"capacity": capacity, "groups": 1, "order": "token_major"}
    return MoECase(
        "capacity_switch_top1_bf16",
        switch_layer,
        (x, router_kernel, wi, wo),
        MOE,
        moe_expect(1, num_experts, "relu", "capacity", capacity=capacity),
        note="top-1 weight = softmax prob (no renorm); dispatch [T,E,C] int one_hot of cumsum-1; "
        "returns (out, aux_loss, z_loss)",
        ref=_ref(x, [_block_ref(router, _ffn_ref("relu", wi, wo), capacity=cap)]),
    )


# ---------------------------------------------------------------------------------------------
# 3. sort-based dispatch with lax.ragged_dot
# ---------------------------------------------------------------------------------------------


def make_sorted_maxtext_ragged_dot() -> MoECase:
    """MaxText sparse_matmul: argsort flat ids, bincount group sizes, ragged_dot x3, inverse-perm gather."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 32, 4
    x = normal(1050, (num_tokens, d_model))
    w_router = _w(1051, (d_model, num_experts), d_model)
    wi_0 = _w(1052, (num_experts, d_model, d_ff), d_model)
    wi_1 = _w(1053, (num_experts, d_model, d_ff), d_model)
    wo = _w(1054, (num_experts, d_ff, d_model), d_ff)

    def sparse_matmul(x, w_router, wi_0, wi_1, wo):
        logits = x @ w_router
        probs = jax.nn.softmax(logits, axis=-1)
        weights, selected_experts = jax.lax.top_k(probs, top_k)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        flatten_selected_experts = jnp.ravel(selected_experts)
        sorted_selected_experts = jnp.argsort(flatten_selected_experts)
        sorted_indices = sorted_selected_experts // top_k
        sorted_inputs = jnp.take(x, indices=sorted_indices, axis=0)
        group_size = jnp.bincount(flatten_selected_experts, length=num_experts)
        layer_w0 = jax.lax.ragged_dot(sorted_inputs, wi_0, group_sizes=group_size)
        layer_w1 = jax.lax.ragged_dot(sorted_inputs, wi_1, group_sizes=group_size)
        intermediate_layer = jax.nn.silu(layer_w0) * layer_w1
        intermediate_output = jax.lax.ragged_dot(intermediate_layer, wo, group_sizes=group_size)
        unsort_indices = jnp.argsort(sorted_selected_experts)
        unsort_intermediate = jnp.take(intermediate_output, indices=unsort_indices, axis=0)
        reshaped_intermediate = jnp.reshape(unsort_intermediate, (-1, top_k, d_model))
        return jnp.einsum("TKD,TK->TD", reshaped_intermediate, weights)

    router = _router_ref(w_router, top_k, renorm=True)
    return MoECase(
        "sorted_maxtext_ragged_dot",
        sparse_matmul,
        (x, w_router, wi_0, wi_1, wo),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "sorted"),
        note="unpermute by gathering with argsort(sort order) (inverse permutation), then einsum over k",
        ref=_ref(x, [_block_ref(router, _ffn_ref("swiglu", wi_1, wo, wi_0))]),
    )


def make_sorted_epmoe_fused_w13_bf16() -> MoECase:
    """SGLang-JAX EPMoE style: fused w13 [E,D,2F], one_hot-sum group sizes, weighted scatter-add."""
    batch, seq, d_model, d_ff, num_experts, top_k = 2, 16, 32, 64, 16, 4
    routed_scaling_factor = 2.0
    hidden = normal(1060, (batch, seq, d_model), BF16)
    router_w = _w(1061, (d_model, num_experts), d_model)
    bias = normal(1062, (num_experts,), scale=0.05)
    w13 = _w(1063, (num_experts, d_model, 2 * d_ff), d_model, BF16)
    w2 = _w(1064, (num_experts, d_ff, d_model), d_ff, BF16)

    def ep_moe(hidden, router_w, bias, w13, w2):
        b, s, d = hidden.shape
        x = hidden.reshape(-1, d)
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ router_w)
        _, topk_ids = jax.lax.top_k(scores + bias[None, :], top_k)
        topk_weights = jnp.take_along_axis(scores, topk_ids, axis=1)
        topk_weights = topk_weights / jnp.sum(topk_weights, axis=-1, keepdims=True)
        topk_weights = topk_weights * routed_scaling_factor
        flat_ids = topk_ids.reshape(-1)
        sort_idx = jnp.argsort(flat_ids)
        token_idx = sort_idx // top_k
        x_sorted = x[token_idx]
        group_sizes = jnp.sum(jax.nn.one_hot(flat_ids, num_experts, dtype=jnp.int32), axis=0)
        gate_up = jax.lax.ragged_dot(x_sorted, w13, group_sizes, preferred_element_type=jnp.float32)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        h = (jax.nn.silu(gate) * up).astype(hidden.dtype)
        y = jax.lax.ragged_dot(h, w2, group_sizes, preferred_element_type=jnp.float32)
        w_sorted = topk_weights.reshape(-1)[sort_idx]
        out = jnp.zeros((x.shape[0], d), jnp.float32).at[token_idx].add(y * w_sorted[:, None])
        return out.astype(hidden.dtype).reshape(b, s, d)

    router = _router_ref(
        router_w, top_k, "sigmoid", selection_bias=bias, renorm=True, scale=routed_scaling_factor
    )
    experts = _ffn_ref("swiglu", w13[..., d_ff:], w2, w13[..., :d_ff])
    return MoECase(
        "sorted_epmoe_fused_w13_bf16",
        ep_moe,
        (hidden, router_w, bias, w13, w2),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "sorted"),
        note="sigmoid+selection bias router, x2.0; w13 = concat[gate, up] on the last axis; "
        "ragged_dot preferred f32; unpermute .at[token].add of weighted rows",
        ref=_ref(hidden, [_block_ref(router, experts)]),
    )


def make_sorted_segment_sum_geglu_bias() -> MoECase:
    """segment_sum group sizes, GeGLU experts with per-expert biases gathered per sorted row."""
    num_tokens, d_model, d_ff, num_experts, top_k = 24, 32, 64, 8, 2
    x = normal(1070, (num_tokens, d_model))
    w_gate_router = _w(1071, (d_model, num_experts), d_model)
    p = {
        "wg": _w(1072, (num_experts, d_model, d_ff), d_model),
        "bg": normal(1073, (num_experts, d_ff), scale=0.1),
        "wu": _w(1074, (num_experts, d_model, d_ff), d_model),
        "bu": normal(1075, (num_experts, d_ff), scale=0.1),
        "wd": _w(1076, (num_experts, d_ff, d_model), d_ff),
        "bd": normal(1077, (num_experts, d_model), scale=0.1),
    }

    def moe(x, w_gate_router, p):
        logits = x @ w_gate_router
        top_logits, top_ids = lax.top_k(logits, top_k)
        top_w = jax.nn.softmax(top_logits, axis=-1)  # Mixtral: softmax over the k kept logits
        flat = top_ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sorted_expert = flat[order]
        rows = x[order // top_k]
        sizes = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=num_experts)
        g = lax.ragged_dot(rows, p["wg"], sizes) + p["bg"][sorted_expert]
        u = lax.ragged_dot(rows, p["wu"], sizes) + p["bu"][sorted_expert]
        h = jax.nn.gelu(g, approximate=False) * u
        y = lax.ragged_dot(h, p["wd"], sizes) + p["bd"][sorted_expert]
        y_unsorted = jnp.zeros_like(y).at[order].set(y).reshape(num_tokens, top_k, d_model)
        return (y_unsorted * top_w[..., None]).sum(axis=1)

    router = _router_ref(w_gate_router, top_k, order="topk_then_score")
    experts = _ffn_ref(
        "geglu",
        p["wu"],
        p["wd"],
        p["wg"],
        gate_b=p["bg"],
        up_b=p["bu"],
        down_b=p["bd"],
        gelu_approximate=False,
    )
    return MoECase(
        "sorted_segment_sum_geglu_bias",
        moe,
        (x, w_gate_router, p),
        MOE,
        moe_expect(top_k, num_experts, "geglu", "sorted"),
        note="exact gelu; expert biases b[sorted_expert] added after each ragged_dot; "
        "unpermute by scatter-set zeros.at[order].set(y)",
        ref=_ref(x, [_block_ref(router, experts)]),
    )


def make_sorted_oai_interleaved_bias() -> MoECase:
    """GPT-OSS in JAX with ragged_dot: interleaved gate_up [E,D,2F] + biases, clamped swiglu."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 16, 4
    limit, alpha = 7.0, 1.702
    x = normal(1080, (num_tokens, d_model))
    router = {
        "kernel": _w(1081, (d_model, num_experts), d_model),
        "bias": normal(1082, (num_experts,), scale=0.1),
    }
    experts = {
        "gate_up_proj": _w(1083, (num_experts, d_model, 2 * d_ff), d_model, gain=4.0),
        "gate_up_proj_bias": normal(1084, (num_experts, 2 * d_ff), scale=0.5),
        "down_proj": _w(1085, (num_experts, d_ff, d_model), d_ff),
        "down_proj_bias": normal(1086, (num_experts, d_model), scale=0.1),
    }

    def gpt_oss_moe(x, router, experts):
        router_logits = x @ router["kernel"] + router["bias"]
        router_top_value, router_indices = jax.lax.top_k(router_logits, top_k)
        router_scores = jax.nn.softmax(router_top_value, axis=1)
        flat = router_indices.reshape(-1)
        perm = jnp.argsort(flat)
        counts = jnp.bincount(flat, length=num_experts)
        expert_of_row = flat[perm]
        xs = jnp.take(x, perm // top_k, axis=0)
        gate_up = jax.lax.ragged_dot(xs, experts["gate_up_proj"], counts)
        gate_up = gate_up + experts["gate_up_proj_bias"][expert_of_row]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = jnp.clip(gate, max=limit)
        up = jnp.clip(up, -limit, limit)
        glu = gate * jax.nn.sigmoid(gate * alpha)
        gated_output = (up + 1) * glu
        out = jax.lax.ragged_dot(gated_output, experts["down_proj"], counts)
        out = out + experts["down_proj_bias"][expert_of_row]
        out = out * router_scores.reshape(-1)[perm][:, None]
        return jax.ops.segment_sum(out, perm // top_k, num_segments=num_tokens)

    gu, gub = experts["gate_up_proj"], experts["gate_up_proj_bias"]
    ffn = _ffn_ref(
        "swiglu_oai",
        gu[..., 1::2],
        experts["down_proj"],
        gu[..., ::2],
        gate_b=gub[..., ::2],
        up_b=gub[..., 1::2],
        down_b=experts["down_proj_bias"],
        limit=limit,
        alpha=alpha,
    )
    rref = _router_ref(router["kernel"], top_k, order="topk_then_score", logit_bias=router["bias"])
    return MoECase(
        "sorted_oai_interleaved_bias",
        gpt_oss_moe,
        (x, router, experts),
        MOE,
        moe_expect(top_k, num_experts, "swiglu_oai", "sorted"),
        note="router logits + bias, top-k then softmax; gate=gate_up[...,::2], up=[...,1::2]; "
        "unpermute with segment_sum over token ids",
        ref=_ref(x, [_block_ref(rref, ffn)]),
    )


# ---------------------------------------------------------------------------------------------
# 4. per-token weight gather (decode style)
# ---------------------------------------------------------------------------------------------


def make_gather_decode_einsum() -> MoECase:
    """Decode-style: gather each token's k expert weight matrices (w[ids] -> [T,K,D,F]) and einsum."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(1090, (num_tokens, d_model))
    wr = _w(1091, (d_model, num_experts), d_model)
    w_gate = _w(1092, (num_experts, d_model, d_ff), d_model)
    w_up = _w(1093, (num_experts, d_model, d_ff), d_model)
    w_down = _w(1094, (num_experts, d_ff, d_model), d_ff)

    def decode_moe(x, wr, w_gate, w_up, w_down):
        probs = jax.nn.softmax(x @ wr, axis=-1)
        w, ids = jax.lax.top_k(probs, top_k)
        w = w / w.sum(-1, keepdims=True)
        g = jnp.einsum("td,tkdf->tkf", x, w_gate[ids])
        u = jnp.einsum("td,tkdf->tkf", x, w_up[ids])
        y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, w_down[ids])
        return jnp.einsum("tkd,tk->td", y, w)

    router = _router_ref(wr, top_k, renorm=True)
    return MoECase(
        "gather_decode_einsum",
        decode_moe,
        (x, wr, w_gate, w_up, w_down),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "gather"),
        note="w[ids] advanced indexing -> [T,K,D,F]; batched einsum td,tkdf->tkf",
        ref=_ref(x, [_block_ref(router, _ffn_ref("swiglu", w_up, w_down, w_gate))]),
    )


def make_gather_take_gelu_bf16_top1() -> MoECase:
    """Batch of 16 one-token decode steps [B,1,D] bf16, top-1 of 8, jnp.take weights, exact GELU MLP."""
    batch, seq, d_model, d_ff, num_experts = 16, 1, 32, 64, 8
    h = normal(1100, (batch, seq, d_model), BF16)
    router_w = _w(1101, (d_model, num_experts), d_model)
    fc1 = _w(1102, (num_experts, d_model, d_ff), d_model, BF16)
    fc2 = _w(1103, (num_experts, d_ff, d_model), d_ff, BF16)

    def step(h, router_w, fc1, fc2):
        logits = jnp.einsum("bsd,de->bse", h.astype(jnp.float32), router_w)
        gate, expert = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), 1)  # [B,S,1]
        w1 = jnp.take(fc1, expert, axis=0)  # [B,S,1,D,F]
        w2 = jnp.take(fc2, expert, axis=0)  # [B,S,1,F,D]
        a = jax.nn.gelu(jnp.einsum("bsd,bskdf->bskf", h, w1), approximate=False)
        y = jnp.einsum("bskf,bskfd->bskd", a, w2)
        return jnp.sum(y * gate[..., None].astype(y.dtype), axis=2)

    router = _router_ref(router_w, 1)
    return MoECase(
        "gather_take_gelu_bf16_top1",
        step,
        (h, router_w, fc1, fc2),
        MOE,
        moe_expect(1, num_experts, "gelu", "gather"),
        note="k=1, weight = softmax prob (no renorm); [B,1,D]; jnp.take(axis=0) of [E,D,F]; exact gelu",
        ref=_ref(h, [_block_ref(router, _ffn_ref("gelu", fc1, fc2, gelu_approximate=False))]),
    )


def make_gather_top1_no_sum() -> MoECase:
    """Top-1 of 8 with no sum over the slots: `y * w` with the chosen expert's SwiGLU weights gathered
    per token by `W[ids[:, 0]]` (the [T, 1] weight broadcast along the features)."""
    num_tokens, d_model, d_ff, num_experts = 24, 32, 48, 8
    x = normal(1150, (num_tokens, d_model))
    router_w = _w(1151, (d_model, num_experts), d_model)
    w_gate = _w(1152, (num_experts, d_model, d_ff), d_model)
    w_up = _w(1153, (num_experts, d_model, d_ff), d_model)
    w_down = _w(1154, (num_experts, d_ff, d_model), d_ff)

    def top1(x, router_w, w_gate, w_up, w_down):
        w, ids = jax.lax.top_k(jax.nn.softmax(x @ router_w, axis=-1), 1)
        e = ids[:, 0]
        h = jax.nn.silu(jnp.einsum("td,tdf->tf", x, w_gate[e])) * jnp.einsum("td,tdf->tf", x, w_up[e])
        return jnp.einsum("tf,tfd->td", h, w_down[e]) * w

    router = _router_ref(router_w, 1)
    return MoECase(
        "gather_top1_no_sum",
        top1,
        (x, router_w, w_gate, w_up, w_down),
        MOE,
        moe_expect(1, num_experts, "swiglu", "gather"),
        note="k=1 and no sum over k: y * w[T, 1]; weights gathered by ids[:, 0]",
        ref=_ref(x, [_block_ref(router, _ffn_ref("swiglu", w_up, w_down, gate=w_gate))]),
    )


def make_gather_gpt_oss_reference() -> MoECase:
    """GPT-OSS reference MLPBlock port: torch-layout mlp1 [E,2F,D] gathered per token, clamped swiglu."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 32, 4
    swiglu_limit = 7.0
    x = normal(1110, (num_tokens, d_model))
    gate_weight = _w(1111, (num_experts, d_model), d_model)  # torch Linear [out, in]
    gate_bias = normal(1112, (num_experts,), scale=0.1)
    mlp1_weight = _w(1113, (num_experts, 2 * d_ff, d_model), d_model, gain=4.0)
    mlp1_bias = normal(1114, (num_experts, 2 * d_ff), scale=0.5)
    mlp2_weight = _w(1115, (num_experts, d_model, d_ff), d_ff)
    mlp2_bias = normal(1116, (num_experts, d_model), scale=0.1)

    def swiglu(x, alpha: float = 1.702, limit: float = 7.0):
        x_glu, x_linear = x[..., ::2], x[..., 1::2]
        x_glu = jnp.clip(x_glu, max=limit)
        x_linear = jnp.clip(x_linear, min=-limit, max=limit)
        out_glu = x_glu * jax.nn.sigmoid(alpha * x_glu)
        return out_glu * (x_linear + 1)

    def mlp_block(x, gate_weight, gate_bias, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias):
        t = x  # (the reference applies RMSNorm first; omitted)
        g = t @ gate_weight.T + gate_bias
        values, expert_indices = jax.lax.top_k(g, top_k)
        expert_weights = jax.nn.softmax(values, axis=1)
        w1 = mlp1_weight[expert_indices, ...]
        b1 = mlp1_bias[expert_indices, ...]
        t = jnp.einsum("beck,bk->bec", w1, t) + b1
        t = swiglu(t, limit=swiglu_limit)
        w2 = mlp2_weight[expert_indices, ...]
        b2 = mlp2_bias[expert_indices, ...]
        t = jnp.einsum("beck,bek->bec", w2, t) + b2
        t = jnp.einsum("bec,be->bc", t, expert_weights)
        return x + t

    ffn = _ffn_ref(
        "swiglu_oai",
        _t(mlp1_weight[:, 1::2, :], 0, 2, 1),
        _t(mlp2_weight, 0, 2, 1),
        _t(mlp1_weight[:, ::2, :], 0, 2, 1),
        gate_b=mlp1_bias[:, ::2],
        up_b=mlp1_bias[:, 1::2],
        down_b=mlp2_bias,
        limit=swiglu_limit,
        alpha=1.702,
    )
    rref = _router_ref(gate_weight.T, top_k, order="topk_then_score", logit_bias=gate_bias)
    return MoECase(
        "gather_gpt_oss_reference",
        mlp_block,
        (x, gate_weight, gate_bias, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias),
        MOE,
        moe_expect(top_k, num_experts, "swiglu_oai", "gather"),
        note="output includes the residual x + moe(x); interleaved gate/up rows of mlp1 [E,2F,D]; "
        "router Linear with bias, topk then softmax",
        ref=_ref(x, [_block_ref(rref, ffn)], residual=True),
    )


# ---------------------------------------------------------------------------------------------
# 5. python loop over experts with masks (unrolled in the jaxpr)
# ---------------------------------------------------------------------------------------------


def make_loop_masks_mixtral() -> MoECase:
    """Mixtral HF-port: torch-layout per-expert w1/w3 [E,F,D], w2 [E,D,F]; for e in range(E) with masks."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 2
    hidden_states = normal(1120, (num_tokens, d_model))
    gate = _w(1121, (num_experts, d_model), d_model)
    w1 = _w(1122, (num_experts, d_ff, d_model), d_model)
    w3 = _w(1123, (num_experts, d_ff, d_model), d_model)
    w2 = _w(1124, (num_experts, d_model, d_ff), d_ff)

    def block(hidden_states, gate, w1, w2, w3):
        router_logits = hidden_states @ gate.T
        routing_weights = jax.nn.softmax(router_logits, axis=1)
        routing_weights, selected_experts = jax.lax.top_k(routing_weights, top_k)
        routing_weights /= routing_weights.sum(axis=-1, keepdims=True)
        final_hidden_states = jnp.zeros_like(hidden_states)
        for expert_idx in range(num_experts):
            mask = selected_experts == expert_idx  # [T, K]
            weight = jnp.sum(jnp.where(mask, routing_weights, 0.0), axis=-1)  # [T]
            current = jax.nn.silu(hidden_states @ w1[expert_idx].T) * (hidden_states @ w3[expert_idx].T)
            current = current @ w2[expert_idx].T
            final_hidden_states = final_hidden_states + weight[:, None] * current
        return final_hidden_states, router_logits

    router = _router_ref(gate.T, top_k, renorm=True)
    ffn = _ffn_ref("swiglu", _t(w3, 0, 2, 1), _t(w2, 0, 2, 1), _t(w1, 0, 2, 1))
    return MoECase(
        "loop_masks_mixtral",
        block,
        (hidden_states, gate, w1, w2, w3),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "loop"),
        note="8 unrolled expert FFNs on all tokens, weight_e = sum(where(ids==e, w, 0)); "
        "returns (out, router_logits)",
        ref=_ref(hidden_states, [_block_ref(router, ffn)]),
    )


class _Qwen2MoeMLP:
    def __init__(self, gate_proj, up_proj, down_proj):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj  # torch [out, in]

    def __call__(self, x):
        return (jax.nn.silu(x @ self.gate_proj.T) * (x @ self.up_proj.T)) @ self.down_proj.T


class _Qwen2MoeSparseMoeBlockPort:
    """HF Qwen2MoeSparseMoeBlock, line by line (dynamic torch.where replaced by dense masks).

    The converted checkpoint stacks the expert Linear weights: experts.gate_proj [E, F, D] etc.
    """

    def __init__(self, params, num_experts, top_k, norm_topk_prob=False):
        self.gate_weight = params["gate"]  # [E, D]
        ex = params["experts"]
        self.experts = [
            _Qwen2MoeMLP(ex["gate_proj"][i], ex["up_proj"][i], ex["down_proj"][i]) for i in range(num_experts)
        ]
        self.shared_expert = _Qwen2MoeMLP(*params["shared_expert"])
        self.shared_expert_gate = params["shared_expert_gate"]  # [1, D]
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob

    def __call__(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        router_logits = hidden_states @ self.gate_weight.T
        routing_weights = jax.nn.softmax(router_logits.astype(jnp.float32), axis=1)
        routing_weights, selected_experts = jax.lax.top_k(routing_weights, self.top_k)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(axis=-1, keepdims=True)
        routing_weights = routing_weights.astype(hidden_states.dtype)
        final_hidden_states = jnp.zeros((batch_size * sequence_length, hidden_dim), hidden_states.dtype)
        expert_mask = jax.nn.one_hot(selected_experts, self.num_experts, dtype=hidden_states.dtype)
        expert_mask = expert_mask.transpose(2, 1, 0)  # [E, K, T]
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            token_weight = jnp.einsum("kt,tk->t", expert_mask[expert_idx], routing_weights)
            current_hidden_states = expert_layer(hidden_states) * token_weight[:, None]
            final_hidden_states = final_hidden_states + current_hidden_states
        shared_expert_output = self.shared_expert(hidden_states)
        shared_gate = jax.nn.sigmoid(hidden_states @ self.shared_expert_gate.T)
        final_hidden_states = final_hidden_states + shared_gate * shared_expert_output
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


def make_loop_qwen2_moe_shared_gate() -> MoECase:
    """Qwen2-MoE: top-4 of 16 without renorm, per-expert loop, shared expert x sigmoid(x @ w_sg)."""
    batch, seq, d_model, d_ff, d_shared, num_experts, top_k = 2, 12, 32, 64, 128, 16, 4
    hidden = normal(1130, (batch, seq, d_model))
    params = {
        "gate": _w(1131, (num_experts, d_model), d_model),
        "experts": {
            "gate_proj": _w(1132, (num_experts, d_ff, d_model), d_model),
            "up_proj": _w(1133, (num_experts, d_ff, d_model), d_model),
            "down_proj": _w(1134, (num_experts, d_model, d_ff), d_ff),
        },
        "shared_expert": (
            _w(1135, (d_shared, d_model), d_model),
            _w(1136, (d_shared, d_model), d_model),
            _w(1137, (d_model, d_shared), d_shared),
        ),
        "shared_expert_gate": _w(1138, (1, d_model), d_model),
    }

    def fn(params, hidden):
        return _Qwen2MoeSparseMoeBlockPort(params, num_experts, top_k)(hidden)

    ex = params["experts"]
    ffn = _ffn_ref(
        "swiglu", _t(ex["up_proj"], 0, 2, 1), _t(ex["down_proj"], 0, 2, 1), _t(ex["gate_proj"], 0, 2, 1)
    )
    sg, su, sd = params["shared_expert"]
    shared = _ffn_ref("swiglu", su.T, sd.T, sg.T, sigmoid_gate=params["shared_expert_gate"].T)
    router = _router_ref(params["gate"].T, top_k)
    return MoECase(
        "loop_qwen2_moe_shared_gate",
        fn,
        (params, hidden),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "loop", shared_expert=True),
        note="torch-layout stacked [E,F,D] weights sliced with python ints into 16 expert objects; "
        "shared expert F=128 scaled by sigmoid(x @ w[D,1]); returns (out, router_logits)",
        ref=_ref(hidden, [_block_ref(router, ffn, shared=shared)]),
    )


class _TorchLinearExpert:
    """One expert as its own module: torch-layout [out, in] Linear weights of its own (not stacked)."""

    def __init__(self, w):
        self.w = w  # {"linear": [F, D], "linear_v": [F, D], "linear_1": [D, F]}

    def __call__(self, x):  # x [B, S, D], multiplied as it is
        g = x @ self.w["linear"].T
        gelu = g * (0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3))))
        return (gelu * (x @ self.w["linear_v"].T)) @ self.w["linear_1"].T


def make_loop_per_expert_modules_torch() -> MoECase:
    """Grok-1 style: each expert a module with weights of its own (a list of dicts, torch [out, in] layout
    applied with `.T`), tokens [B, S, D], top-2 of the logits then softmax, hand-written tanh GeGLU."""
    batch, seq, d_model, d_ff, num_experts, top_k = 2, 8, 32, 48, 6, 2
    x = normal(1140, (batch, seq, d_model))
    router_w = _w(1141, (d_model, num_experts), d_model)
    experts = [
        {
            "linear": _w(1142 + 3 * e, (d_ff, d_model), d_model),
            "linear_v": _w(1143 + 3 * e, (d_ff, d_model), d_model),
            "linear_1": _w(1144 + 3 * e, (d_model, d_ff), d_ff),
        }
        for e in range(num_experts)
    ]

    def block(x, router_w, experts):
        router_logits = x @ router_w  # [B, S, E]
        routing_weights, selected_experts = jax.lax.top_k(router_logits, top_k)
        routing_weights = jax.nn.softmax(routing_weights, axis=-1)
        out = jnp.zeros_like(x)
        for e, expert in enumerate(experts):
            weight = jnp.sum((selected_experts == e).astype(x.dtype) * routing_weights, axis=-1)  # [B, S]
            out = out + weight[..., None] * _TorchLinearExpert(expert)(x)
        return out, router_logits

    def stack(name):
        return jnp.stack([jnp.asarray(ex[name]).T for ex in experts])

    router = _router_ref(router_w, top_k, order="topk_then_score")
    ffn = _ffn_ref("geglu", stack("linear_v"), stack("linear_1"), stack("linear"))
    return MoECase(
        "loop_per_expert_modules_torch",
        block,
        (x, router_w, experts),
        MOE,
        moe_expect(top_k, num_experts, "geglu", "loop"),
        note="6 expert modules, each with its own [F, D] / [D, F] arrays (x @ W.T), never stacked; "
        "[B, S, D] tokens; weight_e = sum(float(ids == e) * w, -1); returns (out, router_logits)",
        ref=_ref(x, [_block_ref(router, ffn)]),
    )


def make_loop_per_expert_unrolled_slots() -> MoECase:
    """PhiMoE style: experts with [in, out] arrays of their own, top-3 of 8, and each expert's weight
    written out as the sum over the k slots of where(ids[:, j] == e, w[:, j], 0)."""
    num_tokens, d_model, d_ff, num_experts, top_k = 24, 32, 40, 8, 3
    x = normal(1150, (num_tokens, d_model))
    router_w = _w(1151, (d_model, num_experts), d_model)
    experts = [
        (_w(1152 + 3 * e, (d_model, d_ff), d_model), _w(1153 + 3 * e, (d_model, d_ff), d_model),
         _w(1154 + 3 * e, (d_ff, d_model), d_ff))
        for e in range(num_experts)
    ]

    def block(x, router_w, experts):
        probs = jax.nn.softmax(x @ router_w, axis=-1)
        w, ids = jax.lax.top_k(probs, top_k)
        w = w / w.sum(-1, keepdims=True)
        out = jnp.zeros_like(x)
        for e, (w_gate, w_up, w_down) in enumerate(experts):
            weight = jnp.zeros((x.shape[0],), x.dtype)
            for j in range(top_k):
                weight = weight + jnp.where(ids[:, j] == e, w[:, j], 0.0)
            y = (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down
            out = out + y * weight[:, None]
        return out

    gate, up, down = (jnp.stack([ex[i] for ex in experts]) for i in range(3))
    router = _router_ref(router_w, top_k, renorm=True)
    return MoECase(
        "loop_per_expert_unrolled_slots",
        block,
        (x, router_w, experts),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "loop"),
        note="8 experts as tuples of their own arrays; weight_e = 0 + where(ids[:, 0] == e, w[:, 0], 0) + "
        "... over the 3 slots",
        ref=_ref(x, [_block_ref(router, _ffn_ref("swiglu", up, down, gate))]),
    )


def make_loop_stacked_unrolled_slots_mul() -> MoECase:
    """Stacked [E, D, F] weights sliced per expert, each expert's weight the slot sum written out as
    w[:, j] * (ids[:, j] == e), GELU experts (erf), top-2 of 4."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 4, 2
    x = normal(1160, (num_tokens, d_model))
    router_w = _w(1161, (d_model, num_experts), d_model)
    w_in = _w(1162, (num_experts, d_model, d_ff), d_model)
    w_out = _w(1163, (num_experts, d_ff, d_model), d_ff)

    def block(x, router_w, w_in, w_out):
        w, ids = jax.lax.top_k(jax.nn.softmax(x @ router_w, axis=-1), top_k)
        out = jnp.zeros_like(x)
        for e in range(num_experts):
            weight = w[:, 0] * (ids[:, 0] == e) + w[:, 1] * (ids[:, 1] == e)
            out = out + weight[:, None] * (jax.nn.gelu(x @ w_in[e], approximate=False) @ w_out[e])
        return out

    router = _router_ref(router_w, top_k)
    return MoECase(
        "loop_stacked_unrolled_slots_mul",
        block,
        (x, router_w, w_in, w_out),
        MOE,
        moe_expect(top_k, num_experts, "gelu", "loop"),
        note="weight_e = w[:, 0] * (ids[:, 0] == e) + w[:, 1] * (ids[:, 1] == e); exact GELU; no renorm",
        ref=_ref(x, [_block_ref(router, _ffn_ref("gelu", w_in, w_out, gelu_approximate=False))]),
    )


# ---------------------------------------------------------------------------------------------
# 6. jax.vmap over experts
# ---------------------------------------------------------------------------------------------


def make_vmap_experts_swiglu() -> MoECase:
    """Per-expert MLP function vmapped over the stacked expert axis -> [E,T,D], combine [T,E]."""
    num_tokens, d_model, d_ff, num_experts, top_k = 24, 32, 64, 8, 2
    x = normal(1200, (num_tokens, d_model))
    router_w = _w(1201, (d_model, num_experts), d_model)
    wg = _w(1202, (num_experts, d_model, d_ff), d_model)
    wu = _w(1203, (num_experts, d_model, d_ff), d_model)
    wd = _w(1204, (num_experts, d_ff, d_model), d_ff)

    def expert_mlp(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    def moe(x, router_w, wg, wu, wd):
        probs = jax.nn.softmax(x @ router_w, axis=-1)
        w, ids = jax.lax.top_k(probs, top_k)
        w = w / w.sum(-1, keepdims=True)
        combine = jnp.zeros((x.shape[0], num_experts), x.dtype)
        combine = combine.at[jnp.arange(x.shape[0])[:, None], ids].add(w)
        all_out = jax.vmap(expert_mlp, in_axes=(None, 0, 0, 0))(x, wg, wu, wd)  # [E,T,D]
        return jnp.einsum("etd,te->td", all_out, combine)

    router = _router_ref(router_w, top_k, renorm=True)
    return MoECase(
        "vmap_experts_swiglu",
        moe,
        (x, router_w, wg, wu, wd),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "vmap"),
        note="jax.vmap(expert_mlp, in_axes=(None,0,0,0)); combine [T,E] by .at[t, ids].add(w)",
        ref=_ref(x, [_block_ref(router, _ffn_ref("swiglu", wu, wd, wg))]),
    )


def make_vmap_experts_dict_gelu_bias() -> MoECase:
    """vmap over a stacked param dict (biased GELU MLP, tanh approx), top-3 of 16, one_hot combine."""
    num_tokens, d_model, d_ff, num_experts, top_k = 20, 48, 96, 16, 3
    x = normal(1210, (num_tokens, d_model))
    router_w = _w(1211, (d_model, num_experts), d_model)
    expert_params = {
        "w_in": _w(1212, (num_experts, d_model, d_ff), d_model),
        "b_in": normal(1213, (num_experts, d_ff), scale=0.1),
        "w_out": _w(1214, (num_experts, d_ff, d_model), d_ff),
        "b_out": normal(1215, (num_experts, d_model), scale=0.1),
    }

    def mlp(p, x):
        return jax.nn.gelu(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]

    def moe(x, router_w, expert_params):
        gates = jax.nn.softmax(x @ router_w)
        top_vals, top_idx = jax.lax.top_k(gates, top_k)
        top_vals = top_vals / jnp.sum(top_vals, axis=-1, keepdims=True)
        combine = jnp.einsum("tk,tke->te", top_vals, jax.nn.one_hot(top_idx, num_experts))
        outs = jax.vmap(mlp, in_axes=(0, None))(expert_params, x)  # [E,T,D]
        return jnp.einsum("etd,te->td", outs, combine)

    router = _router_ref(router_w, top_k, renorm=True)
    ffn = _ffn_ref(
        "gelu",
        expert_params["w_in"],
        expert_params["w_out"],
        up_b=expert_params["b_in"],
        down_b=expert_params["b_out"],
        gelu_approximate=True,
    )
    return MoECase(
        "vmap_experts_dict_gelu_bias",
        moe,
        (x, router_w, expert_params),
        MOE,
        moe_expect(top_k, num_experts, "gelu", "vmap"),
        note="vmap over a param-dict pytree (in_axes=(0, None)); expert biases; gelu tanh-approx",
        ref=_ref(x, [_block_ref(router, ffn)]),
    )


# ---------------------------------------------------------------------------------------------
# 7. shared experts (DeepSeek, Ling-2.6)
# ---------------------------------------------------------------------------------------------


def make_shared_deepseek_v3_sorted() -> MoECase:
    """DeepSeek-V3-style: sigmoid + e_score_correction_bias, 4 groups keep 2, x2.5, sorted, shared expert."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 32, 4
    n_group, topk_group, scale = 4, 2, 2.5
    x = normal(1220, (num_tokens, d_model))
    gate_w = _w(1221, (d_model, num_experts), d_model)
    e_bias = normal(1222, (num_experts,), scale=0.05)
    w_gate = _w(1223, (num_experts, d_model, d_ff), d_model)
    w_up = _w(1224, (num_experts, d_model, d_ff), d_model)
    w_down = _w(1225, (num_experts, d_ff, d_model), d_ff)
    shared = {
        "gate": _w(1226, (d_model, d_ff), d_model),
        "up": _w(1227, (d_model, d_ff), d_model),
        "down": _w(1228, (d_ff, d_model), d_ff),
    }

    def route(x, gate_w, e_bias):
        scores = jax.nn.sigmoid(x @ gate_w)
        s_choice = scores + e_bias
        grouped = s_choice.reshape(-1, n_group, num_experts // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, group_idx = jax.lax.top_k(group_scores, topk_group)
        group_mask = jax.nn.one_hot(group_idx, n_group).sum(1)  # [T, n_group]
        score_mask = jnp.repeat(group_mask, num_experts // n_group, axis=-1)
        s_choice = jnp.where(score_mask > 0, s_choice, -jnp.inf)
        _, ids = jax.lax.top_k(s_choice, top_k)
        w = jnp.take_along_axis(scores, ids, axis=-1)
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
        return w * scale, ids

    def moe(x, gate_w, e_bias, w_gate, w_up, w_down, shared):
        w, ids = route(x, gate_w, e_bias)
        flat = ids.reshape(-1)
        idx = jnp.argsort(flat)
        tok = idx // top_k
        sizes = jnp.bincount(flat, length=num_experts)
        xs = x[tok]
        h = jax.nn.silu(lax.ragged_dot(xs, w_gate, sizes)) * lax.ragged_dot(xs, w_up, sizes)
        ys = lax.ragged_dot(h, w_down, sizes) * w.reshape(-1)[idx][:, None]
        routed = jnp.zeros_like(x).at[tok].add(ys)
        shared_out = (jax.nn.silu(x @ shared["gate"]) * (x @ shared["up"])) @ shared["down"]
        return routed + shared_out

    router = _router_ref(
        gate_w,
        top_k,
        "sigmoid",
        selection_bias=e_bias,
        n_group=n_group,
        topk_group=topk_group,
        renorm=True,
        scale=scale,
    )
    sref = _ffn_ref("swiglu", shared["up"], shared["down"], shared["gate"])
    return MoECase(
        "shared_deepseek_v3_sorted",
        moe,
        (x, gate_w, e_bias, w_gate, w_up, w_down, shared),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "sorted", shared_expert=True),
        note="group score top2_sum, -inf masked_fill; ragged_dot; weighted scatter-add; + shared SwiGLU",
        ref=_ref(x, [_block_ref(router, _ffn_ref("swiglu", w_up, w_down, w_gate), shared=sref)]),
    )


def make_shared_ling26_block() -> MoECase:
    """Ling-2.6-style: sigmoid+bias, 8 groups keep 4, top-8 of 64, x2.5, SwiGLU, shared expert; bf16 dense."""
    batch, seq, d_model, d_ff, num_experts, top_k = 2, 16, 32, 32, 64, 8
    n_group, topk_group, routed_scaling_factor = 8, 4, 2.5
    hidden = normal(1230, (batch, seq, d_model), BF16)
    params = {
        "gate": {
            "weight": _w(1231, (num_experts, d_model), d_model, BF16),
            "expert_bias": normal(1232, (num_experts,), scale=0.02, offset=0.05),
        },
        "experts": {
            "gate_up": _w(1233, (num_experts, d_model, 2 * d_ff), d_model, BF16),
            "down": _w(1234, (num_experts, d_ff, d_model), d_ff, BF16),
        },
        "shared_experts": {
            "gate_up": _w(1235, (d_model, 2 * d_ff), d_model, BF16),
            "down": _w(1236, (d_ff, d_model), d_ff, BF16),
        },
    }

    def swiglu_mlp(x, gate_up, down):
        g, u = jnp.split(x @ gate_up, 2, axis=-1)
        return (jax.nn.silu(g) * u) @ down

    def ling_moe(params, hidden):
        b, s, d = hidden.shape
        x = hidden.reshape(b * s, d)
        logits = x.astype(jnp.float32) @ params["gate"]["weight"].astype(jnp.float32).T
        scores = jax.nn.sigmoid(logits)
        biased = scores + params["gate"]["expert_bias"]
        group_scores = jnp.sort(biased.reshape(b * s, n_group, -1), axis=-1)[..., -2:].sum(-1)
        _, group_idx = jax.lax.top_k(group_scores, topk_group)
        group_mask = jnp.zeros_like(group_scores).at[jnp.arange(b * s)[:, None], group_idx].set(1.0)
        expert_mask = jnp.repeat(group_mask, num_experts // n_group, axis=1)
        _, topk_idx = jax.lax.top_k(jnp.where(expert_mask > 0, biased, 0.0), top_k)
        topk_w = jnp.take_along_axis(scores, topk_idx, axis=1)
        topk_w = topk_w / (topk_w.sum(-1, keepdims=True) + 1e-20) * routed_scaling_factor
        # dense: all 64 experts on all tokens, then a [T,E] combine
        combine = (
            jnp.zeros((b * s, num_experts), jnp.float32).at[jnp.arange(b * s)[:, None], topk_idx].add(topk_w)
        )
        gu = jnp.einsum("td,edf->tef", x, params["experts"]["gate_up"])
        g, u = jnp.split(gu, 2, axis=-1)
        ye = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, params["experts"]["down"])
        routed = jnp.einsum("ted,te->td", ye.astype(jnp.float32), combine)
        shared = swiglu_mlp(x, params["shared_experts"]["gate_up"], params["shared_experts"]["down"])
        return (routed + shared.astype(jnp.float32)).astype(hidden.dtype).reshape(b, s, d)

    gu, sgu = params["experts"]["gate_up"], params["shared_experts"]["gate_up"]
    router = _router_ref(
        params["gate"]["weight"].T,
        top_k,
        "sigmoid",
        selection_bias=params["gate"]["expert_bias"],
        n_group=n_group,
        topk_group=topk_group,
        renorm=True,
        scale=routed_scaling_factor,
    )
    ffn = _ffn_ref("swiglu", gu[..., d_ff:], params["experts"]["down"], gu[..., :d_ff])
    sref = _ffn_ref("swiglu", sgu[:, d_ff:], params["shared_experts"]["down"], sgu[:, :d_ff])
    return MoECase(
        "shared_ling26_block",
        ling_moe,
        (params, hidden),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "dense", shared_expert=True),
        note="group score = sum of top-2 via jnp.sort; masked_fill 0.0; gate_up [E,D,2F] split in half, "
        "bf16 experts; f32 combine",
        ref=_ref(hidden, [_block_ref(router, ffn, shared=sref)]),
    )


# ---------------------------------------------------------------------------------------------
# 8. framework / structure variants: Flax NNX, lax.scan over layers, jax.checkpoint
# ---------------------------------------------------------------------------------------------


class _NnxMoE(nnx.Module):
    def __init__(self, d_model, d_ff, num_experts, top_k, *, rngs: nnx.Rngs):
        self.router = nnx.Linear(d_model, num_experts, use_bias=False, rngs=rngs)
        # fan_in = D for every expert (the expert axis is a batch axis of the initializer)
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        self.wi_gate = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff)))
        self.wi_up = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff)))
        self.wo = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model)))
        self.num_experts, self.top_k = num_experts, top_k

    def __call__(self, x):
        logits = self.router(x)  # [B,S,E]
        probs = nnx.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)
        weights = weights / weights.sum(-1, keepdims=True)
        wg = self.wi_gate[...][experts]  # [B,S,K,D,F]
        wu = self.wi_up[...][experts]
        wo = self.wo[...][experts]
        h = nnx.gelu(jnp.einsum("bsd,bskdf->bskf", x, wg), approximate=False)
        h = h * jnp.einsum("bsd,bskdf->bskf", x, wu)
        y = jnp.einsum("bskf,bskfd->bskd", h, wo)
        out = jnp.einsum("bskd,bsk->bsd", y, weights)
        # Switch-style load balancing loss on the top-1 assignment
        frac = jnp.mean(jax.nn.one_hot(experts[..., 0], self.num_experts), axis=(0, 1))
        aux = self.num_experts * jnp.sum(frac * jnp.mean(probs, axis=(0, 1)))
        return out, aux


def make_nnx_moe_module() -> MoECase:
    """Flax NNX module (nnx.Linear router + nnx.Param stacked experts) via nnx.split / nnx.merge."""
    batch, seq, d_model, d_ff, num_experts, top_k = 2, 16, 32, 64, 8, 2
    module = _NnxMoE(d_model, d_ff, num_experts, top_k, rngs=nnx.Rngs(1240))
    graphdef, state = nnx.split(module)
    x = normal(1241, (batch, seq, d_model))

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    router = _router_ref(module.router.kernel[...], top_k, renorm=True)
    ffn = _ffn_ref("geglu", module.wi_up[...], module.wo[...], module.wi_gate[...], gelu_approximate=False)
    return MoECase(
        "nnx_moe_module",
        fn,
        (state, x),
        MOE,
        moe_expect(top_k, num_experts, "geglu", "gather"),
        note="params arrive as an nnx.State argument; per-token weight gather [B,S,K,D,F]; exact gelu; "
        "returns (out, aux_loss)",
        ref=_ref(x, [_block_ref(router, ffn)]),
    )


def make_scan_layers_sorted() -> MoECase:
    """3 MoE layers in lax.scan over stacked [L,E,D,F] weights, residual, sorted ragged_dot dispatch."""
    num_layers, num_tokens, d_model, d_ff, num_experts, top_k = 3, 32, 32, 64, 8, 2
    x = normal(1250, (num_tokens, d_model))
    layers = {
        "router": _w(1251, (num_layers, d_model, num_experts), d_model),
        "w_gate": _w(1252, (num_layers, num_experts, d_model, d_ff), d_model),
        "w_up": _w(1253, (num_layers, num_experts, d_model, d_ff), d_model),
        "w_down": _w(1254, (num_layers, num_experts, d_ff, d_model), d_ff, gain=0.5),
    }

    def moe_layer(h, p):
        probs = jax.nn.softmax(h @ p["router"], axis=-1)
        w, ids = lax.top_k(probs, top_k)
        w = w / jnp.sum(w, -1, keepdims=True)
        flat = ids.reshape(-1)
        perm = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=num_experts)
        xs = h[perm // top_k]
        a = jax.nn.silu(lax.ragged_dot(xs, p["w_gate"], sizes)) * lax.ragged_dot(xs, p["w_up"], sizes)
        y = lax.ragged_dot(a, p["w_down"], sizes)
        y = y[jnp.argsort(perm)].reshape(-1, top_k, d_model)
        return jnp.sum(y * w[..., None], axis=1)

    def model(x, layers):
        def body(h, p):
            return h + moe_layer(h, p), None

        h, _ = lax.scan(body, x, layers)
        return h

    blocks = [
        _block_ref(
            _router_ref(layers["router"][i], top_k, renorm=True),
            _ffn_ref("swiglu", layers["w_up"][i], layers["w_down"][i], layers["w_gate"][i]),
        )
        for i in range(num_layers)
    ]
    return MoECase(
        "scan_layers_sorted",
        model,
        (x, layers),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "sorted"),
        count=1,
        note="lax.scan body = one MoE block (count 1, 3 iterations); output h_L with residual each layer",
        ref=_ref(x, blocks, residual=True),
    )


@jax.custom_vjp
def _permute_rows(rows, order):
    """rows[order], with its own backward (a scatter of the cotangent back to where each row came from)."""
    return rows[order]


def _permute_rows_fwd(rows, order):
    return rows[order], order


def _permute_rows_bwd(order, g):
    return jnp.zeros_like(g).at[order].set(g), None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def make_sorted_shard_map_repeated_rows() -> MoECase:
    """Softmax outside a shard_map; inside: top-k / max(sum, eps), every token repeated k times and
    sorted by expert through a custom_vjp permutation, ragged_dot, unsorted by the inverse order,
    combined by einsum over the k slots."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 2
    x = normal(1260, (num_tokens, d_model))
    params = {
        "router": _w(1261, (d_model, num_experts), d_model),
        "w_gate": _w(1262, (num_experts, d_model, d_ff), d_model),
        "w_up": _w(1263, (num_experts, d_model, d_ff), d_model),
        "w_down": _w(1264, (num_experts, d_ff, d_model), d_ff, gain=0.5),
    }
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    rep = jax.sharding.PartitionSpec()

    def local(x, probs, w_gate, w_up, w_down):
        w, ids = lax.top_k(probs, top_k)
        w = w / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1e-8)
        flat = ids.reshape(-1)
        order = jnp.argsort(flat)
        rows = _permute_rows(jnp.repeat(x, top_k, axis=0), order)
        sizes = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
        h = jax.nn.silu(lax.ragged_dot(rows, w_gate, sizes)) * lax.ragged_dot(rows, w_up, sizes)
        y = _permute_rows(lax.ragged_dot(h, w_down, sizes), jnp.argsort(order))
        return jnp.einsum("tkd,tk->td", y.reshape(num_tokens, top_k, d_model), w)

    def model(x, params):
        probs = jax.nn.softmax(x @ params["router"], axis=-1)
        body = jax.shard_map(local, mesh=mesh, in_specs=(rep,) * 5, out_specs=rep, check_vma=False)
        return body(x, probs, params["w_gate"], params["w_up"], params["w_down"])

    return MoECase(
        "sorted_shard_map_repeated_rows",
        model,
        (x, params),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "sorted"),
        note="router probabilities are a shard_map input; dispatch jnp.repeat(x, k)[order] by custom_vjp",
        ref=_ref(x, [_block_ref(_router_ref(params["router"], top_k, renorm=True),
                                _ffn_ref("swiglu", params["w_up"], params["w_down"], params["w_gate"]))]),
    )


# ---------------------------------------------------------------------------------------------
# Llama4: the router's weight scales the token before its expert, the outputs are summed unweighted
# ---------------------------------------------------------------------------------------------


def _llama4_params(seed, d_model, d_ff, num_experts):
    return {
        "router": _w(seed, (d_model, num_experts), d_model, gain=3.0),
        "w_gate": _w(seed + 1, (num_experts, d_model, d_ff), d_model),
        "w_up": _w(seed + 2, (num_experts, d_model, d_ff), d_model),
        "w_down": _w(seed + 3, (num_experts, d_ff, d_model), d_ff),
        "s_gate": _w(seed + 4, (d_model, d_ff), d_model),
        "s_up": _w(seed + 5, (d_model, d_ff), d_model),
        "s_down": _w(seed + 6, (d_ff, d_model), d_ff),
    }


def _llama4_ref(x, p, top_k):
    router = _router_ref(p["router"], top_k, "sigmoid", "topk_then_score")
    experts = _ffn_ref("swiglu", p["w_up"], p["w_down"], p["w_gate"])
    shared = _ffn_ref("swiglu", p["s_up"], p["s_down"], p["s_gate"])
    return _ref(x, [_block_ref(router, experts, shared=shared, weights_on_input=True)])


def _llama4_shared(x, p):
    return (jax.nn.silu(x @ p["s_gate"]) * (x @ p["s_up"])) @ p["s_down"]


def make_llama4_sorted_top1_sigmoid() -> MoECase:
    """Llama4 (HF / EasyDeL, written plainly): top-1 of the logits, its sigmoid scales the token before
    the expert; rows sorted by expert, ragged_dot SwiGLU, put back in token order (one slot: no sum);
    plus the shared expert."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 1
    x = normal(1300, (num_tokens, d_model))
    params = _llama4_params(1301, d_model, d_ff, num_experts)

    def moe(x, p):
        top_logit, ids = lax.top_k(x @ p["router"], top_k)
        w = jax.nn.sigmoid(top_logit)  # [T, 1]
        flat = ids.reshape(-1)
        order = jnp.argsort(flat)
        rows = (x * w)[order]  # the token scaled by its routing weight, then sorted
        sizes = jnp.bincount(flat, length=num_experts)
        h = jax.nn.silu(lax.ragged_dot(rows, p["w_gate"], sizes)) * lax.ragged_dot(rows, p["w_up"], sizes)
        routed = lax.ragged_dot(h, p["w_down"], sizes)[jnp.argsort(order)]  # [T, D]
        return _llama4_shared(x, p) + routed

    return MoECase(
        "llama4_sorted_top1_sigmoid",
        moe,
        (x, params),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "sorted", shared_expert=True),
        note="sigmoid(top-1 logit) * x before the expert FFN (weights on the input); unsorted rows are the "
        "output (k=1, nothing summed); + shared SwiGLU",
        ref=_llama4_ref(x, params, top_k),
    )


def make_llama4_dense_scores_matrix() -> MoECase:
    """Llama4 as HF writes it: a [T, E] score matrix (the sigmoid of the top logit at its expert, 0
    elsewhere) scales the token for every expert; every expert runs on every scaled token and the
    outputs are summed over the experts; plus the shared expert."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 1
    x = normal(1310, (num_tokens, d_model))
    params = _llama4_params(1311, d_model, d_ff, num_experts)

    def moe(x, p):
        top_logit, ids = lax.top_k(x @ p["router"], top_k)
        rows = jnp.arange(num_tokens)[:, None]
        scores = jnp.zeros((num_tokens, num_experts)).at[rows, ids].set(jax.nn.sigmoid(top_logit))
        routed_in = x[None] * scores.T[:, :, None]  # [E, T, D]
        gate = jnp.einsum("etd,edf->etf", routed_in, p["w_gate"])
        up = jnp.einsum("etd,edf->etf", routed_in, p["w_up"])
        routed_out = jnp.einsum("etf,efd->etd", jax.nn.silu(gate) * up, p["w_down"])
        return _llama4_shared(x, p) + routed_out.sum(0)

    return MoECase(
        "llama4_dense_scores_matrix",
        moe,
        (x, params),
        MOE,
        moe_expect(top_k, num_experts, "swiglu", "dense", shared_expert=True),
        note="x * scores[:, e] for every expert e (0 for the experts not chosen: SwiGLU without biases maps "
        "it to 0), batched einsums over experts, sum over experts; + shared SwiGLU",
        ref=_llama4_ref(x, params, top_k),
    )


def make_checkpoint_two_layers_relu_bias() -> MoECase:
    """Two unrolled MoE layers, each under jax.checkpoint (nothing_saveable); dense ReLU MLP with biases."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(1260, (num_tokens, d_model))

    def layer_params(seed):
        return {
            "router": _w(seed, (d_model, num_experts), d_model),
            "w1": _w(seed + 1, (num_experts, d_model, d_ff), d_model),
            "b1": normal(seed + 2, (num_experts, d_ff), scale=0.1),
            "w2": _w(seed + 3, (num_experts, d_ff, d_model), d_ff, gain=0.5),
            "b2": normal(seed + 4, (num_experts, d_model), scale=0.1),
        }

    params = [layer_params(1261), layer_params(1271)]

    @_remat_nothing_saveable
    def moe_block(h, p):
        probs = jax.nn.softmax(jnp.einsum("td,de->te", h, p["router"]), axis=-1)
        top_p, top_e = lax.top_k(probs, top_k)
        top_p = top_p / top_p.sum(-1, keepdims=True)
        cw = (jax.nn.one_hot(top_e, num_experts) * top_p[..., None]).sum(1)  # [T,E]
        a = jax.nn.relu(jnp.einsum("td,edf->tef", h, p["w1"]) + p["b1"])
        y = jnp.einsum("tef,efd->ted", a, p["w2"]) + p["b2"]
        return jnp.einsum("ted,te->td", y, cw)

    def model(x, params):
        h = x
        for p in params:
            h = h + moe_block(h, p)
        return h

    blocks = [
        _block_ref(
            _router_ref(p["router"], top_k, renorm=True),
            _ffn_ref("relu", p["w1"], p["w2"], up_b=p["b1"], down_b=p["b2"]),
        )
        for p in params
    ]
    return MoECase(
        "checkpoint_two_layers_relu_bias",
        model,
        (x, params),
        MOE,
        moe_expect(top_k, num_experts, "relu", "dense"),
        count=2,
        note="jax.checkpoint(policy=nothing_saveable) around each block; 2 unrolled layers (count 2); "
        "expert biases; dense all-expert einsum; residual",
        ref=_ref(x, blocks, residual=True),
    )


ALL_MOE_BLOCKS = [
    # dense
    make_dense_tpu_inference_onehot,
    make_dense_maxtext_bsd_bf16_scatter,
    # capacity
    make_capacity_gshard_top2,
    make_capacity_maxtext_token_major,
    make_capacity_switch_top1_bf16,
    # sorted
    make_sorted_maxtext_ragged_dot,
    make_sorted_epmoe_fused_w13_bf16,
    make_sorted_segment_sum_geglu_bias,
    make_sorted_oai_interleaved_bias,
    # gather
    make_gather_decode_einsum,
    make_gather_take_gelu_bf16_top1,
    make_gather_top1_no_sum,
    make_gather_gpt_oss_reference,
    # loop
    make_loop_masks_mixtral,
    make_loop_qwen2_moe_shared_gate,
    make_loop_per_expert_modules_torch,
    make_loop_per_expert_unrolled_slots,
    make_loop_stacked_unrolled_slots_mul,
    # vmap
    make_vmap_experts_swiglu,
    make_vmap_experts_dict_gelu_bias,
    # shared experts
    make_shared_deepseek_v3_sorted,
    make_shared_ling26_block,
    # structure
    make_nnx_moe_module,
    make_scan_layers_sorted,
    make_sorted_shard_map_repeated_rows,
    make_checkpoint_two_layers_relu_bias,
    # weights on the input (Llama4)
    make_llama4_sorted_top1_sigmoid,
    make_llama4_dense_scores_matrix,
]
