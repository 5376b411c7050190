"""A second, blind batch of whole MoE blocks (router + dispatch + expert FFN + combine).

Each ``make_<name>()`` returns a :class:`MoECase` (see ``tests/zoo/moe_blocks.py`` for the
conventions); the spellings imitate different real-world authors and were written without looking
at any matcher.  ``BLIND2_MOE_BLOCKS`` lists them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from . import normal
from .moe_blocks import MOE, MoECase, _block_ref, _ffn_ref, _ref, _router_ref, _t, _w, moe_expect

F32 = jnp.float32
BF16 = jnp.bfloat16


def _case(name, fn, args, expect, ref, note, count=1) -> MoECase:
    return MoECase(name=name, fn=fn, args=args, family=MOE, expect=expect, count=count, note=note, ref=ref)


# ---------------------------------------------------------------------------------------------
# 1. dense over all experts, combine matrix from one_hot, [B, S, D] tokens, params dict (MaxText-ish
#    "dense_matmul" naming: wi_0 / wi_1 / wo)
# ---------------------------------------------------------------------------------------------


def make_dense_onehot_combine_bsd() -> MoECase:
    B, S, D, F, E, K = 2, 8, 32, 64, 8, 2
    x = normal(1101, (B, S, D))
    params = {
        "gate": {"kernel": _w(1102, (D, E), D)},
        "wi_0": _w(1103, (E, D, F), D),
        "wi_1": _w(1104, (E, D, F), D),
        "wo": _w(1105, (E, F, D), F),
    }

    def moe_layer(params, inputs):
        logits = jnp.einsum("bsd,de->bse", inputs, params["gate"]["kernel"])
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_e = lax.top_k(probs, K)
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        # [b, s, k, e] one-hot weighted by the gate, summed over k -> dense combine weights
        combine = jnp.sum(jax.nn.one_hot(top_e, E, dtype=inputs.dtype) * top_p[..., None], axis=2)
        gate_act = jnp.einsum("bsd,edf->bsef", inputs, params["wi_0"])
        up_act = jnp.einsum("bsd,edf->bsef", inputs, params["wi_1"])
        hidden = jax.nn.silu(gate_act) * up_act
        expert_out = jnp.einsum("bsef,efd->bsed", hidden, params["wo"])
        return jnp.einsum("bsed,bse->bsd", expert_out, combine)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(params["gate"]["kernel"], K, "softmax", renorm=True),
                _ffn_ref("swiglu", params["wi_1"], params["wo"], params["wi_0"]),
            )
        ],
    )
    return _case(
        "dense_onehot_combine_bsd",
        moe_layer,
        (params, x),
        moe_expect(K, E, "swiglu", "dense"),
        ref,
        "softmax top-2 renormalised; every expert on every token (einsum bsd,edf->bsef), combine [b,s,e] "
        "from one_hot(top_e) * top_p summed over k",
    )


# ---------------------------------------------------------------------------------------------
# 2. dense, torch-style [out, in] weights held by a plain class (closure), arange == comparisons and
#    jnp.where, Mixtral routing (top-k on logits then softmax), exact-gelu GeGLU, bf16
# ---------------------------------------------------------------------------------------------


class _TorchishSparseMoeBlock:
    def __init__(self, gate_weight, w1, w3, w2, top_k):
        self.gate_weight = gate_weight  # [E, D]   nn.Linear(D, E, bias=False).weight
        self.w1 = w1  # [E, F, D]
        self.w3 = w3  # [E, F, D]
        self.w2 = w2  # [E, D, F]
        self.top_k = top_k
        self.num_experts = gate_weight.shape[0]

    def __call__(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        router_logits = hidden_states.astype(F32) @ self.gate_weight.astype(F32).T
        top_logits, selected_experts = lax.top_k(router_logits, self.top_k)
        routing_weights = jax.nn.softmax(top_logits, axis=-1)
        expert_ids = jnp.arange(self.num_experts)
        hit = selected_experts[:, :, None] == expert_ids[None, None, :]  # [T, k, E]
        dense_weights = jnp.where(hit, routing_weights[:, :, None], 0.0).sum(axis=1)  # [T, E]
        g = jnp.einsum("td,efd->etf", hidden_states, self.w1)
        u = jnp.einsum("td,efd->etf", hidden_states, self.w3)
        a = jax.nn.gelu(g, approximate=False) * u
        per_expert = jnp.einsum("etf,edf->etd", a, self.w2)
        final = jnp.einsum("etd,te->td", per_expert.astype(F32), dense_weights)
        final = final.astype(hidden_states.dtype).reshape(batch_size, sequence_length, hidden_dim)
        return final, router_logits


def make_dense_torch_layout_geglu_bf16() -> MoECase:
    B, S, D, F, E, K = 2, 6, 32, 48, 8, 2
    x = normal(1201, (B, S, D), BF16)
    gate_weight = _w(1202, (E, D), D, BF16)
    w1 = _w(1203, (E, F, D), D, BF16)
    w3 = _w(1204, (E, F, D), D, BF16)
    w2 = _w(1205, (E, D, F), F, BF16)
    block = _TorchishSparseMoeBlock(gate_weight, w1, w3, w2, K)

    def forward(hidden_states):
        return block(hidden_states)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(_t(gate_weight, 1, 0), K, "softmax", "topk_then_score"),
                _ffn_ref("geglu", _t(w3, 0, 2, 1), _t(w2, 0, 2, 1), _t(w1, 0, 2, 1), gelu_approximate=False),
            )
        ],
    )
    return _case(
        "dense_torch_layout_geglu_bf16",
        forward,
        (x,),
        moe_expect(K, E, "geglu", "dense"),
        ref,
        "Mixtral routing (top-2 of f32 logits, softmax over the 2); torch [out,in] weights transposed in "
        "einsums; exact (erf) gelu GeGLU; combine via (ids == arange(E)) + where; bf16 params/activations; "
        "returns (out, router_logits)",
    )


# ---------------------------------------------------------------------------------------------
# 3. per-token weight gather w[idx] -> [T, k, D, F], sigmoid router renormalised, GELU with biases
# ---------------------------------------------------------------------------------------------


def make_gather_sigmoid_gelu_bias() -> MoECase:
    T, D, F, E, K = 24, 32, 64, 8, 2
    x = normal(1301, (T, D))
    wr = _w(1302, (D, E), D)
    w_in = _w(1303, (E, D, F), D)
    b_in = normal(1304, (E, F), scale=0.1)
    w_out = _w(1305, (E, F, D), F)
    b_out = normal(1306, (E, D), scale=0.1)

    def moe(x, wr, w_in, b_in, w_out, b_out):
        affinities = jax.nn.sigmoid(x @ wr)
        vals, idx = lax.top_k(affinities, K)
        vals = vals / vals.sum(-1, keepdims=True)
        h = jnp.einsum("td,tkdf->tkf", x, w_in[idx]) + b_in[idx]
        h = jax.nn.gelu(h)
        o = jnp.einsum("tkf,tkfd->tkd", h, w_out[idx]) + b_out[idx]
        return jnp.einsum("tkd,tk->td", o, vals)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(wr, K, "sigmoid", renorm=True),
                _ffn_ref("gelu", w_in, w_out, up_b=b_in, down_b=b_out, gelu_approximate=True),
            )
        ],
    )
    return _case(
        "gather_sigmoid_gelu_bias",
        moe,
        (x, wr, w_in, b_in, w_out, b_out),
        moe_expect(K, E, "gelu", "gather"),
        ref,
        "sigmoid scores, top-2, renormalised; per-token gather of expert weights w_in[idx] [T,k,D,F] and "
        "biases; tanh gelu; expert biases on both linears",
    )


# ---------------------------------------------------------------------------------------------
# 4. Equinox-like pytree module, vmap over tokens, jnp.take of the k experts, ReLU, torch layout
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class _EqxLikeMoE:
    def __init__(self, router_weight, fc1, fc2, top_k):
        self.router_weight = router_weight  # [E, D]
        self.fc1 = fc1  # [E, F, D]
        self.fc2 = fc2  # [E, D, F]
        self.top_k = top_k

    def tree_flatten(self):
        return (self.router_weight, self.fc1, self.fc2), self.top_k

    @classmethod
    def tree_unflatten(cls, top_k, children):
        return cls(*children, top_k=top_k)

    def _one_token(self, tok):
        probs = jax.nn.softmax(self.router_weight @ tok)
        weight, chosen = lax.top_k(probs, self.top_k)
        fc1 = jnp.take(self.fc1, chosen, axis=0)  # [k, F, D]
        fc2 = jnp.take(self.fc2, chosen, axis=0)  # [k, D, F]
        hidden = jax.nn.relu(fc1 @ tok)  # [k, F]
        out = jnp.einsum("kdf,kf->kd", fc2, hidden)
        return weight @ out

    def __call__(self, x):
        return jax.vmap(self._one_token)(x)


def make_gather_vmap_tokens_eqx_relu() -> MoECase:
    T, D, F, E, K = 20, 24, 40, 6, 2
    x = normal(1401, (T, D))
    model = _EqxLikeMoE(_w(1402, (E, D), D), _w(1403, (E, F, D), D), _w(1404, (E, D, F), F), K)

    def call(model, x):
        return model(x)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(_t(model.router_weight, 1, 0), K, "softmax"),
                _ffn_ref("relu", _t(model.fc1, 0, 2, 1), _t(model.fc2, 0, 2, 1)),
            )
        ],
    )
    return _case(
        "gather_vmap_tokens_eqx_relu",
        call,
        (model, x),
        moe_expect(K, E, "relu", "gather"),
        ref,
        "Equinox-style pytree module; jax.vmap over tokens, each token softmax -> top-2 (no renorm) and "
        "jnp.take of its 2 experts' torch-layout weights; ReLU FFN",
    )


# ---------------------------------------------------------------------------------------------
# 5. MaxText-style sparse matmul: argsort of flattened ids, bincount group sizes, lax.ragged_dot with
#    preferred_element_type, unsort with argsort(argsort); bf16
# ---------------------------------------------------------------------------------------------


def make_sorted_maxtext_ragged_bf16() -> MoECase:
    B, S, D, F, E, K = 2, 16, 32, 64, 8, 2
    inputs = normal(1501, (B, S, D), BF16)
    gate_kernel = _w(1502, (D, E), D)  # router kept in f32
    wi_0 = _w(1503, (E, D, F), D, BF16)
    wi_1 = _w(1504, (E, D, F), D, BF16)
    wo = _w(1505, (E, F, D), F, BF16)

    def sparse_matmul(inputs, gate_kernel, wi_0, wi_1, wo):
        batch, seq, emb = inputs.shape
        inputs_2d = inputs.reshape(batch * seq, emb)
        gate_logits = jnp.dot(inputs_2d.astype(F32), gate_kernel)
        top_k_weights, top_k_indices = lax.top_k(gate_logits, K)
        top_k_weights = jax.nn.softmax(top_k_weights.astype(F32), axis=-1)

        flatten_selected_experts = jnp.ravel(top_k_indices)
        sorted_selected_experts = jnp.argsort(flatten_selected_experts)
        sorted_indices = sorted_selected_experts // K
        sorted_inputs = jnp.take(inputs_2d, indices=sorted_indices, axis=0)
        group_size = jnp.bincount(flatten_selected_experts, length=E)

        layer_w0 = lax.ragged_dot(sorted_inputs, wi_0, group_sizes=group_size, preferred_element_type=F32)
        layer_w1 = lax.ragged_dot(sorted_inputs, wi_1, group_sizes=group_size, preferred_element_type=F32)
        intermediate_layer = (jax.nn.silu(layer_w0) * layer_w1).astype(BF16)
        intermediate_output = lax.ragged_dot(
            intermediate_layer, wo, group_sizes=group_size, preferred_element_type=F32
        )

        unsort_intermediate = jnp.take(intermediate_output, jnp.argsort(sorted_selected_experts), axis=0)
        reshaped_intermediate = unsort_intermediate.reshape(-1, K, emb)
        output = jnp.einsum("BKE,BK -> BE", reshaped_intermediate, top_k_weights)
        return output.reshape(batch, seq, emb).astype(inputs.dtype)

    ref = _ref(
        inputs,
        [
            _block_ref(
                _router_ref(gate_kernel, K, "softmax", "topk_then_score"),
                _ffn_ref("swiglu", wi_1, wo, wi_0),
            )
        ],
    )
    return _case(
        "sorted_maxtext_ragged_bf16",
        sparse_matmul,
        (inputs, gate_kernel, wi_0, wi_1, wo),
        moe_expect(K, E, "swiglu", "sorted"),
        ref,
        "MaxText sparse_matmul: top-2 of f32 logits then softmax over the 2; argsort flattened ids, "
        "take rows (// k), bincount group sizes, three lax.ragged_dot (bf16 in, f32 out), unsort with "
        "argsort(sort order), einsum over k",
    )


# ---------------------------------------------------------------------------------------------
# 6. SGLang-EPMoE-style: fused w13 [E, 2F, D] torch layout, lax.sort with payload, searchsorted seg
#    pointers, ragged_dot, scatter back with .at[].set, routed scaling factor
# ---------------------------------------------------------------------------------------------


def make_sorted_epmoe_fused_w13() -> MoECase:
    T, D, F, E, K = 32, 32, 48, 16, 4
    hidden_states = normal(1601, (T, D))
    router_w = _w(1602, (E, D), D)
    w13_weight = _w(1603, (E, 2 * F, D), D)
    w2_weight = _w(1604, (E, D, F), F)
    routed_scaling_factor = 1.5

    def ep_moe_forward(hidden_states, router_w, w13_weight, w2_weight):
        num_tokens = hidden_states.shape[0]
        router_logits = jnp.matmul(hidden_states, router_w.T)
        scores = jax.nn.softmax(router_logits, axis=-1)
        topk_weights, topk_ids = lax.top_k(scores, K)
        topk_weights = topk_weights / topk_weights.sum(axis=-1, keepdims=True)
        topk_weights = topk_weights * routed_scaling_factor

        flat_ids = topk_ids.reshape(-1).astype(jnp.int32)
        slots = jnp.arange(num_tokens * K, dtype=jnp.int32)
        reorder_topk_ids, src2dst = lax.sort((flat_ids, slots), num_keys=1, is_stable=True)
        seg_indptr = jnp.searchsorted(reorder_topk_ids, jnp.arange(E + 1, dtype=jnp.int32), side="left")
        group_sizes = (seg_indptr[1:] - seg_indptr[:-1]).astype(jnp.int32)

        gateup_input = hidden_states[src2dst // K]
        gateup_output = lax.ragged_dot(
            gateup_input, jnp.swapaxes(w13_weight, 1, 2), group_sizes, preferred_element_type=F32
        )
        gate, up = jnp.split(gateup_output, 2, axis=-1)
        down_input = jax.nn.silu(gate) * up
        down_output = lax.ragged_dot(
            down_input, jnp.swapaxes(w2_weight, 1, 2), group_sizes, preferred_element_type=F32
        )
        per_slot = jnp.zeros((num_tokens * K, down_output.shape[-1]), F32).at[src2dst].set(down_output)
        per_slot = per_slot.reshape(num_tokens, K, -1)
        return jnp.sum(per_slot * topk_weights[..., None], axis=1)

    ref = _ref(
        hidden_states,
        [
            _block_ref(
                _router_ref(_t(router_w, 1, 0), K, "softmax", renorm=True, scale=routed_scaling_factor),
                _ffn_ref(
                    "swiglu",
                    _t(w13_weight[:, F:, :], 0, 2, 1),
                    _t(w2_weight, 0, 2, 1),
                    _t(w13_weight[:, :F, :], 0, 2, 1),
                ),
            )
        ],
    )
    return _case(
        "sorted_epmoe_fused_w13",
        ep_moe_forward,
        (hidden_states, router_w, w13_weight, w2_weight),
        moe_expect(K, E, "swiglu", "sorted"),
        ref,
        "SGLang EPMoE-like: softmax top-4 of 16, renormalised, x1.5 routed scaling; lax.sort (ids, slot) "
        "with payload, searchsorted seg_indptr -> group sizes; fused w13 [E,2F,D] (gate first, up second) "
        "through ragged_dot then split; scatter back with .at[src2dst].set; weighted sum over k",
    )


# ---------------------------------------------------------------------------------------------
# 7. counting sort without argsort: one_hot counts, exclusive cumsum offsets, rank by cumsum,
#    scatter rows into the sorted buffer, ragged_dot, segment_sum combine; GeGLU with biases
# ---------------------------------------------------------------------------------------------


def make_sorted_cumsum_segment_sum_geglu() -> MoECase:
    B, S, D, F, E, K = 4, 8, 32, 64, 8, 2
    x = normal(1701, (B, S, D))
    p = {
        "router": _w(1702, (D, E), D),
        "gate_w": _w(1703, (E, D, F), D),
        "gate_b": normal(1704, (E, F), scale=0.1),
        "up_w": _w(1705, (E, D, F), D),
        "up_b": normal(1706, (E, F), scale=0.1),
        "down_w": _w(1707, (E, F, D), F),
        "down_b": normal(1708, (E, D), scale=0.1),
    }

    def block(p, x):
        b, s, d = x.shape
        n = b * s
        tokens = x.reshape(n, d)
        gates = jax.nn.softmax(tokens @ p["router"], axis=-1)
        gate_vals, expert_idx = lax.top_k(gates, K)

        assign_expert = expert_idx.reshape(-1)  # [n*K], token-major
        assign_token = jnp.repeat(jnp.arange(n), K)
        assign_gate = gate_vals.reshape(-1)
        onehot = (assign_expert[:, None] == jnp.arange(E)[None, :]).astype(jnp.int32)  # [n*K, E]
        counts = onehot.sum(axis=0)
        starts = jnp.cumsum(counts) - counts
        rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
        dest = starts[assign_expert] + rank  # position of each assignment in expert-sorted order

        xs = jnp.zeros((n * K, d), tokens.dtype).at[dest].set(tokens[assign_token])
        es = jnp.zeros((n * K,), jnp.int32).at[dest].set(assign_expert)
        ts = jnp.zeros((n * K,), jnp.int32).at[dest].set(assign_token)
        ws = jnp.zeros((n * K,), gates.dtype).at[dest].set(assign_gate)

        g = lax.ragged_dot(xs, p["gate_w"], counts) + p["gate_b"][es]
        u = lax.ragged_dot(xs, p["up_w"], counts) + p["up_b"][es]
        y = lax.ragged_dot(jax.nn.gelu(g) * u, p["down_w"], counts) + p["down_b"][es]
        out = jax.ops.segment_sum(y * ws[:, None], ts, num_segments=n)
        return out.reshape(b, s, d)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(p["router"], K, "softmax"),
                _ffn_ref(
                    "geglu",
                    p["up_w"],
                    p["down_w"],
                    p["gate_w"],
                    gate_b=p["gate_b"],
                    up_b=p["up_b"],
                    down_b=p["down_b"],
                    gelu_approximate=True,
                ),
            )
        ],
    )
    return _case(
        "sorted_cumsum_segment_sum_geglu",
        block,
        (p, x),
        moe_expect(K, E, "geglu", "sorted"),
        ref,
        "softmax top-2 (no renorm); counting sort: counts from (ids == arange) one-hot, exclusive cumsum "
        "offsets, in-expert rank by cumsum, .at[dest].set into sorted buffers; ragged_dot with per-row "
        "gathered expert biases; tanh-gelu GeGLU; combine by jax.ops.segment_sum over token ids",
    )


# ---------------------------------------------------------------------------------------------
# 8. Flax NNX module, Python loop over experts with masks, ReLU with biases, top-3
# ---------------------------------------------------------------------------------------------


class _NnxExpert(nnx.Module):
    def __init__(self, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias):
        self.fc1_kernel = nnx.Param(fc1_kernel)  # [D, F]
        self.fc1_bias = nnx.Param(fc1_bias)
        self.fc2_kernel = nnx.Param(fc2_kernel)  # [F, D]
        self.fc2_bias = nnx.Param(fc2_bias)

    def __call__(self, x):
        h = nnx.relu(x @ self.fc1_kernel[...] + self.fc1_bias[...])
        return h @ self.fc2_kernel[...] + self.fc2_bias[...]


class _NnxLoopMoE(nnx.Module):
    def __init__(self, router_kernel, experts, top_k):
        self.router_kernel = nnx.Param(router_kernel)
        self.experts = nnx.List(experts) if hasattr(nnx, "List") else experts
        self.top_k = top_k

    def __call__(self, x):
        probs = nnx.softmax(x @ self.router_kernel[...], axis=-1)
        topw, topi = lax.top_k(probs, self.top_k)
        out = jnp.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = topi == e  # [T, k]
            w_e = jnp.sum(jnp.where(mask, topw, 0.0), axis=-1)  # [T]
            out = out + w_e[:, None] * expert(x)
        return out


def make_loop_nnx_relu_bias() -> MoECase:
    T, D, F, E, K = 16, 32, 64, 6, 3
    x = normal(1801, (T, D))
    router = _w(1802, (D, E), D)
    fc1 = _w(1803, (E, D, F), D)
    b1 = normal(1804, (E, F), scale=0.1)
    fc2 = _w(1805, (E, F, D), F)
    b2 = normal(1806, (E, D), scale=0.1)
    experts = [_NnxExpert(fc1[e], b1[e], fc2[e], b2[e]) for e in range(E)]
    model = _NnxLoopMoE(router, experts, K)
    graphdef, state = nnx.split(model)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(router, K, "softmax"),
                _ffn_ref("relu", fc1, fc2, up_b=b1, down_b=b2),
            )
        ],
    )
    return _case(
        "loop_nnx_relu_bias",
        apply,
        (state, x),
        moe_expect(K, E, "relu", "loop"),
        ref,
        "Flax NNX module (split/merge); softmax top-3 of 6 (no renorm); Python loop over the expert "
        "submodules, each on all tokens, weighted by sum(where(topi == e, topw, 0)); ReLU FFN with biases",
    )


# ---------------------------------------------------------------------------------------------
# 9. vmap over stacked expert params (dict pytree), combine matrix via .at[rows, ids].set
# ---------------------------------------------------------------------------------------------


def make_vmap_experts_pytree_swiglu() -> MoECase:
    T, D, F, E, K = 32, 32, 32, 16, 4
    x = normal(1901, (T, D))
    router = {"w": _w(1902, (D, E), D)}
    experts = {
        "w_gate": _w(1903, (E, D, F), D),
        "w_up": _w(1904, (E, D, F), D),
        "w_down": _w(1905, (E, F, D), F),
    }

    def expert_fn(ep, tokens):
        return (jax.nn.silu(tokens @ ep["w_gate"]) * (tokens @ ep["w_up"])) @ ep["w_down"]

    def moe(router, experts, x):
        logits = x @ router["w"]
        probs = jax.nn.softmax(logits.astype(F32), axis=-1)
        w, ids = lax.top_k(probs, K)
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        rows = jnp.arange(x.shape[0])[:, None]
        combine = jnp.zeros((x.shape[0], E), F32).at[rows, ids].set(w)  # [T, E]
        all_out = jax.vmap(expert_fn, in_axes=(0, None))(experts, x)  # [E, T, D]
        return jnp.einsum("etd,te->td", all_out, combine)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(router["w"], K, "softmax", renorm=True),
                _ffn_ref("swiglu", experts["w_up"], experts["w_down"], experts["w_gate"]),
            )
        ],
    )
    return _case(
        "vmap_experts_pytree_swiglu",
        moe,
        (router, experts, x),
        moe_expect(K, E, "swiglu", "vmap"),
        ref,
        "softmax top-4 of 16, renormalised (+1e-20 in the denominator); jax.vmap of one SwiGLU expert over "
        "the stacked expert dict -> [E,T,D]; combine [T,E] built with .at[rows, ids].set",
    )


# ---------------------------------------------------------------------------------------------
# 10. GShard top-2 with expert capacity (token dropping), dispatch/combine tensors [G, S, E, C]
# ---------------------------------------------------------------------------------------------


def make_capacity_gshard_top2_relu() -> MoECase:
    G, S, M, H, E, C = 2, 16, 32, 64, 4, 6
    K = 2
    x = normal(2001, (G, S, M))
    wg = _w(2002, (M, E), M)
    wi = _w(2003, (E, M, H), M)
    wo = _w(2004, (E, H, M), H)

    def gshard_moe(x, wg, wi, wo):
        logits = jnp.einsum("gsm,me->gse", x, wg)
        raw_gates = jax.nn.softmax(logits, axis=-1)

        index_1 = jnp.argmax(raw_gates, axis=-1)
        mask_1 = jax.nn.one_hot(index_1, E, dtype=F32)
        gate_1 = jnp.sum(raw_gates * mask_1, axis=-1)
        gates_without_top_1 = raw_gates * (1.0 - mask_1)
        index_2 = jnp.argmax(gates_without_top_1, axis=-1)
        mask_2 = jax.nn.one_hot(index_2, E, dtype=F32)
        gate_2 = jnp.sum(gates_without_top_1 * mask_2, axis=-1)
        denom = gate_1 + gate_2
        gate_1 = gate_1 / denom
        gate_2 = gate_2 / denom

        position_in_expert_1 = jnp.cumsum(mask_1, axis=1) - mask_1  # exclusive cumsum over S
        mask_1 = mask_1 * (position_in_expert_1 < C)
        mask_1_count = jnp.sum(mask_1, axis=1, keepdims=True)  # [G, 1, E]
        position_in_expert_2 = jnp.cumsum(mask_2, axis=1) - mask_2 + mask_1_count
        mask_2 = mask_2 * (position_in_expert_2 < C)

        mask_1_flat = jnp.sum(mask_1, axis=-1)
        mask_2_flat = jnp.sum(mask_2, axis=-1)
        pos_1 = jnp.sum(position_in_expert_1 * mask_1, axis=-1).astype(jnp.int32)
        pos_2 = jnp.sum(position_in_expert_2 * mask_2, axis=-1).astype(jnp.int32)
        gate_1 = gate_1 * mask_1_flat
        gate_2 = gate_2 * mask_2_flat

        dispatch_1 = mask_1[..., None] * jax.nn.one_hot(pos_1, C, dtype=F32)[:, :, None, :]
        dispatch_2 = mask_2[..., None] * jax.nn.one_hot(pos_2, C, dtype=F32)[:, :, None, :]
        combine_tensor = gate_1[..., None, None] * dispatch_1 + gate_2[..., None, None] * dispatch_2
        dispatch_tensor = dispatch_1 + dispatch_2  # [G, S, E, C]

        expert_inputs = jnp.einsum("gsec,gsm->egcm", dispatch_tensor, x)
        h = jax.nn.relu(jnp.einsum("egcm,emh->egch", expert_inputs, wi))
        expert_outputs = jnp.einsum("egch,ehm->egcm", h, wo)
        return jnp.einsum("gsec,egcm->gsm", combine_tensor, expert_outputs)

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(wg, K, "softmax", renorm=True),
                _ffn_ref("relu", wi, wo),
                capacity={"capacity": C, "groups": G, "order": "choice_major"},
            )
        ],
    )
    return _case(
        "capacity_gshard_top2_relu",
        gshard_moe,
        (x, wg, wi, wo),
        moe_expect(K, E, "relu", "capacity", capacity=C),
        ref,
        "GShard top-2: argmax / mask / second argmax, gates renormalised over the 2 BEFORE dropping; groups "
        "= the G=2 rows of x (16 tokens each), C=6 slots per expert per group; first choices fill slots in "
        "token order, then second choices after the kept first choices (choice-major); overflow dropped "
        "(weight 0, no re-normalisation); no random 2nd-expert policy",
    )


# ---------------------------------------------------------------------------------------------
# 11. DeepSeek-V3 / Ling style: sigmoid, correction bias for selection, group-limited top-k
#     (top-2-sum group score), renorm, routed scaling, shared expert; torch layout, dense compute
# ---------------------------------------------------------------------------------------------


def make_deepseek_v3_group_limited_shared() -> MoECase:
    B, S, D, F, Fs, E, K = 2, 8, 32, 32, 64, 16, 4
    n_group, topk_group, routed_scaling_factor = 4, 2, 2.5
    hidden_states = normal(2101, (B, S, D))
    weights = {
        "gate.weight": _w(2102, (E, D), D),
        "gate.e_score_correction_bias": normal(2103, (E,), scale=0.05),
        "experts.gate_proj": _w(2104, (E, F, D), D),
        "experts.up_proj": _w(2105, (E, F, D), D),
        "experts.down_proj": _w(2106, (E, D, F), F),
        "shared_experts.gate_proj": _w(2107, (Fs, D), D),
        "shared_experts.up_proj": _w(2108, (Fs, D), D),
        "shared_experts.down_proj": _w(2109, (D, Fs), Fs),
    }

    def deepseek_moe(weights, hidden_states):
        orig_shape = hidden_states.shape
        hs = hidden_states.reshape(-1, orig_shape[-1])
        n_tok = hs.shape[0]
        router_logits = hs.astype(F32) @ weights["gate.weight"].astype(F32).T
        scores = jax.nn.sigmoid(router_logits)
        scores_for_choice = scores + weights["gate.e_score_correction_bias"][None, :]
        grouped = scores_for_choice.reshape(n_tok, n_group, E // n_group)
        group_scores = lax.top_k(grouped, 2)[0].sum(axis=-1)  # [T, n_group]
        group_idx = lax.top_k(group_scores, topk_group)[1]
        group_mask = jnp.zeros_like(group_scores).at[jnp.arange(n_tok)[:, None], group_idx].set(1.0)
        score_mask = jnp.repeat(group_mask, E // n_group, axis=-1)  # [T, E]
        tmp_scores = jnp.where(score_mask > 0, scores_for_choice, -jnp.inf)
        topk_indices = lax.top_k(tmp_scores, K)[1]
        topk_weights = jnp.take_along_axis(scores, topk_indices, axis=-1)
        topk_weights = topk_weights / (jnp.sum(topk_weights, axis=-1, keepdims=True) + 1e-20)
        topk_weights = topk_weights * routed_scaling_factor

        combine = jnp.zeros((n_tok, E), F32).at[jnp.arange(n_tok)[:, None], topk_indices].add(topk_weights)
        gate = jnp.einsum("td,efd->tef", hs, weights["experts.gate_proj"])
        up = jnp.einsum("td,efd->tef", hs, weights["experts.up_proj"])
        down = jnp.einsum("tef,edf->ted", jax.nn.silu(gate) * up, weights["experts.down_proj"])
        routed = jnp.einsum("ted,te->td", down, combine)

        sh_gate = hs @ weights["shared_experts.gate_proj"].T
        sh = jax.nn.silu(sh_gate) * (hs @ weights["shared_experts.up_proj"].T)
        shared = sh @ weights["shared_experts.down_proj"].T
        return (routed + shared).reshape(orig_shape)

    ref = _ref(
        hidden_states,
        [
            _block_ref(
                _router_ref(
                    _t(weights["gate.weight"], 1, 0),
                    K,
                    "sigmoid",
                    selection_bias=weights["gate.e_score_correction_bias"],
                    n_group=n_group,
                    topk_group=topk_group,
                    group_score="top2_sum",
                    renorm=True,
                    scale=routed_scaling_factor,
                ),
                _ffn_ref(
                    "swiglu",
                    _t(weights["experts.up_proj"], 0, 2, 1),
                    _t(weights["experts.down_proj"], 0, 2, 1),
                    _t(weights["experts.gate_proj"], 0, 2, 1),
                ),
                shared=_ffn_ref(
                    "swiglu",
                    _t(weights["shared_experts.up_proj"], 1, 0),
                    _t(weights["shared_experts.down_proj"], 1, 0),
                    _t(weights["shared_experts.gate_proj"], 1, 0),
                ),
            )
        ],
    )
    return _case(
        "deepseek_v3_group_limited_shared",
        deepseek_moe,
        (weights, hidden_states),
        moe_expect(K, E, "swiglu", "dense", shared_expert=True),
        ref,
        "DeepSeek-V3 / Ling routing: sigmoid, e_score_correction_bias for selection only, 4 groups scored "
        "by top-2 sum, keep 2 groups (others -inf), top-4, weights from unbiased scores, renorm (+1e-20), "
        "x2.5; all experts computed densely (torch layout), combine via .at[].add; ungated SwiGLU shared "
        "expert (F=64) added",
    )


# ---------------------------------------------------------------------------------------------
# 12. decode step: [B, 1, D] with B=3, per-token gather in a Python loop over the k slots, bf16, GELU
# ---------------------------------------------------------------------------------------------


def make_decode_gather_bf16_gelu() -> MoECase:
    B, D, F, E, K = 3, 64, 128, 16, 2
    x = normal(2201, (B, 1, D), BF16)
    router_w = _w(2202, (D, E), D)
    w_fc = _w(2203, (E, F, D), D, BF16)  # torch [out, in]
    w_proj = _w(2204, (E, D, F), F, BF16)

    def decode_moe(x, router_w, w_fc, w_proj):
        tok = x[:, 0, :]  # [B, D], one new token per sequence
        probs = jax.nn.softmax(tok.astype(F32) @ router_w, axis=-1)
        top_w, top_ids = lax.top_k(probs, K)
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        acc = jnp.zeros(tok.shape, F32)
        for slot in range(K):
            e = top_ids[:, slot]
            h = jnp.matmul(w_fc[e], tok[:, :, None])[..., 0]  # [B, F]
            h = jax.nn.gelu(h, approximate=True)
            y = jnp.matmul(w_proj[e], h[:, :, None])[..., 0]  # [B, D]
            acc = acc + top_w[:, slot, None] * y.astype(F32)
        return acc.astype(x.dtype)[:, None, :]

    ref = _ref(
        x,
        [
            _block_ref(
                _router_ref(router_w, K, "softmax", renorm=True),
                _ffn_ref("gelu", _t(w_fc, 0, 2, 1), _t(w_proj, 0, 2, 1), gelu_approximate=True),
            )
        ],
    )
    return _case(
        "decode_gather_bf16_gelu",
        decode_moe,
        (x, router_w, w_fc, w_proj),
        moe_expect(K, E, "gelu", "gather"),
        ref,
        "decode-size block (B=3 sequences x 1 token); f32 softmax router, top-2 renormalised; Python loop "
        "over the 2 slots gathering torch-layout bf16 expert weights w_fc[ids] and batched matmul; tanh gelu",
    )


BLIND2_MOE_BLOCKS = [
    make_dense_onehot_combine_bsd,
    make_dense_torch_layout_geglu_bf16,
    make_gather_sigmoid_gelu_bias,
    make_gather_vmap_tokens_eqx_relu,
    make_sorted_maxtext_ragged_bf16,
    make_sorted_epmoe_fused_w13,
    make_sorted_cumsum_segment_sum_geglu,
    make_loop_nnx_relu_bias,
    make_vmap_experts_pytree_swiglu,
    make_capacity_gshard_top2_relu,
    make_deepseek_v3_group_limited_shared,
    make_decode_gather_bf16_gelu,
]
