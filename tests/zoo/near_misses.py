"""Programs that look like MoE routers but are not, or differ semantically in a way a fused router op
cannot express. None of them may ever be rewritten. Each case's ``note`` says why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import NEAR_MISS, ZooCase, normal

F32 = jnp.float32


def _case(name, fn, args, note) -> ZooCase:
    return ZooCase(name, fn, args, NEAR_MISS, {}, count=0, note=note)


def make_nm_lm_topk_sampling() -> ZooCase:
    """LM head over V=32000, temperature, top-50, softmax over the 50, categorical sample."""
    batch, d_model, vocab, top_k = 4, 32, 32000, 50
    h = normal(200, (batch, d_model))
    w_vocab = normal(201, (d_model, vocab), scale=d_model**-0.5)
    key = jax.random.key(202)

    def sample(h, w_vocab, key, temperature=0.7):
        logits = (h @ w_vocab) / temperature
        top_logits, top_tokens = lax.top_k(logits, top_k)
        probs = jax.nn.softmax(top_logits, axis=-1)
        choice = jax.random.categorical(key, jnp.log(probs), axis=-1)
        next_token = jnp.take_along_axis(top_tokens, choice[:, None], axis=-1)[:, 0]
        return next_token

    return _case(
        "nm_lm_topk_sampling",
        sample,
        (h, w_vocab, key),
        "top-k sampling over a 32000-token vocabulary: probs feed a categorical sampler, not experts",
    )


def make_nm_top_p_sampling() -> ZooCase:
    """Nucleus sampling: softmax over vocab, sort by top_k(k=V), cumsum mask, categorical."""
    batch, d_model, vocab = 2, 32, 8192
    h = normal(203, (batch, d_model))
    w_vocab = normal(204, (d_model, vocab), scale=d_model**-0.5)
    key = jax.random.key(205)

    def top_p(h, w_vocab, key, p=0.9):
        probs = jax.nn.softmax(h @ w_vocab, axis=-1)
        sorted_probs, sorted_idx = lax.top_k(probs, vocab)
        cum = jnp.cumsum(sorted_probs, axis=-1)
        keep = (cum - sorted_probs) < p
        filtered = jnp.where(keep, sorted_probs, 0.0)
        filtered = filtered / filtered.sum(axis=-1, keepdims=True)
        choice = jax.random.categorical(key, jnp.log(filtered), axis=-1)
        return jnp.take_along_axis(sorted_idx, choice[:, None], axis=-1)[:, 0]

    return _case(
        "nm_top_p_sampling",
        top_p,
        (h, w_vocab, key),
        "nucleus sampling: full sort via top_k(k=V), cumsum threshold, categorical draw",
    )


def make_nm_attention_topk_keys() -> ZooCase:
    """Sparse attention: softmax(q k^T / sqrt(d)) then top-4 keys per query, renorm, gather v."""
    batch, seq, d_head, top_k = 2, 16, 32, 4
    x = normal(206, (batch, seq, d_head))
    wq = normal(207, (d_head, d_head), scale=d_head**-0.5)
    wk = normal(208, (d_head, d_head), scale=d_head**-0.5)
    wv = normal(209, (d_head, d_head), scale=d_head**-0.5)

    def attn(x, wq, wk, wv):
        q, k, v = x @ wq, x @ wk, x @ wv
        scores = jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(jnp.float32(d_head))
        probs = jax.nn.softmax(scores, axis=-1)
        top_p, top_i = lax.top_k(probs, top_k)
        top_p = top_p / top_p.sum(-1, keepdims=True)
        v_sel = jax.vmap(lambda vb, ib: vb[ib])(v, top_i)  # [B, Q, k, D]
        return jnp.einsum("bqk,bqkd->bqd", top_p, v_sel)

    return _case(
        "nm_attention_topk_keys",
        attn,
        (x, wq, wk, wv),
        "top-k over attention keys: the 'weight matrix' is an activation (k = x @ wk), not a router",
    )


def make_nm_topk_values_reused_raw() -> ZooCase:
    """Softmax -> top-2 -> renorm, but the raw pre-renorm top-k probabilities also feed a loss."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(210, (num_tokens, d_model))
    w = normal(211, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        raw, ids = lax.top_k(probs, top_k)
        weights = raw / raw.sum(-1, keepdims=True)
        confidence_loss = -jnp.mean(jnp.log(raw[:, 0]))
        return weights, ids, raw, confidence_loss

    return _case(
        "nm_topk_values_reused_raw",
        fn,
        (x, w),
        "raw (un-renormalised) top-k probabilities escape and feed a loss; a fused op does not produce them",
    )


def make_nm_renorm_over_tokens() -> ZooCase:
    """Softmax -> top-2 -> 'renorm' that sums over the TOKEN axis (axis 0), not over k."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(212, (num_tokens, d_model))
    w = normal(213, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        vals, ids = lax.top_k(probs, top_k)
        vals = vals / jnp.sum(vals, axis=0, keepdims=True)
        return vals, ids

    return _case(
        "nm_renorm_over_tokens",
        fn,
        (x, w),
        "normalisation runs over tokens (axis 0) instead of over the k chosen experts",
    )


def make_nm_mismatched_k() -> ZooCase:
    """Weights from a top-2, ids taken from positions 2..3 of a separate top-4: they do not correspond."""
    num_tokens, d_model, num_experts = 16, 32, 16
    x = normal(214, (num_tokens, d_model))
    w = normal(215, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        vals2, _ = lax.top_k(probs, 2)
        _, ids4 = lax.top_k(probs, 4)
        weights = vals2 / vals2.sum(-1, keepdims=True)
        return weights, ids4[:, 2:]

    return _case(
        "nm_mismatched_k",
        fn,
        (x, w),
        "weights come from top_k(k=2) while ids are ranks 3-4 of a different top_k(k=4)",
    )


def make_nm_argmax_classifier() -> ZooCase:
    """Classification head: softmax then argmax and max probability (no top_k, no experts)."""
    batch, d_model, num_classes = 16, 32, 10
    x = normal(216, (batch, d_model))
    w = normal(217, (d_model, num_classes), scale=d_model**-0.5)
    b = jnp.asarray(np.zeros((num_classes,), np.float32))

    def classify(x, w, b):
        probs = jax.nn.softmax(x @ w + b, axis=-1)
        return jnp.argmax(probs, axis=-1), jnp.max(probs, axis=-1)

    return _case(
        "nm_argmax_classifier",
        classify,
        (x, w, b),
        "plain classifier: softmax + argmax/max, no top-k dispatch",
    )


def make_nm_sigmoid_biased_weights() -> ZooCase:
    """Sigmoid + bias used for selection AND the biased values gathered as weights."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 16, 4
    x = normal(218, (num_tokens, d_model))
    w = normal(219, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(220, (num_experts,), scale=0.05, offset=0.2)

    def fn(x, w, bias):
        scores = jax.nn.sigmoid(x @ w)
        biased = scores + bias
        ids = lax.top_k(biased, top_k)[1]
        wts = jnp.take_along_axis(biased, ids, axis=-1)  # biased, not the unbiased scores
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
        return wts * 2.5, ids

    return _case(
        "nm_sigmoid_biased_weights",
        fn,
        (x, w, bias),
        "weights gathered from the BIASED scores; F3 semantics use the unbiased sigmoid scores",
    )


def make_nm_expert_choice() -> ZooCase:
    """Expert-choice routing: softmax over experts, then each EXPERT picks its top-C tokens."""
    num_tokens, d_model, num_experts, capacity = 32, 32, 8, 8
    x = normal(221, (num_tokens, d_model))
    w = normal(222, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)  # [T, E]
        gates, token_ids = lax.top_k(probs.T, capacity)  # [E, C]
        return gates, token_ids

    return _case(
        "nm_expert_choice",
        fn,
        (x, w),
        "expert-choice routing: top-k over tokens per expert (transposed), not token-choice top-k",
    )


def make_nm_softmax_over_tokens() -> ZooCase:
    """Softmax over the token axis (axis=0), then top-k over experts."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(223, (num_tokens, d_model))
    w = normal(224, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        probs = jax.nn.softmax(x @ w, axis=0)
        vals, ids = lax.top_k(probs, top_k)
        return vals / vals.sum(-1, keepdims=True), ids

    return _case(
        "nm_softmax_over_tokens",
        fn,
        (x, w),
        "softmax normalises over tokens (axis 0), so scores are not per-token expert probabilities",
    )


def make_nm_knn_retrieval() -> ZooCase:
    """Cosine-similarity retrieval: l2-normalised queries x keys, top-5 raw similarities and ids."""
    num_queries, d_model, num_keys, top_k = 8, 32, 256, 5
    queries = normal(225, (num_queries, d_model))
    keys = normal(226, (d_model, num_keys))

    def retrieve(queries, keys):
        qn = queries / jnp.linalg.norm(queries, axis=-1, keepdims=True)
        kn = keys / jnp.linalg.norm(keys, axis=0, keepdims=True)
        sims = qn @ kn
        return lax.top_k(sims, top_k)

    return _case(
        "nm_knn_retrieval",
        retrieve,
        (queries, keys),
        "nearest-neighbour retrieval: raw cosine similarities, no softmax/sigmoid, no experts",
    )


def make_nm_topk_distill_loss() -> ZooCase:
    """Top-k distillation loss: teacher softmax top-8 weights student log-probs; scalar output."""
    batch, d_model, vocab, top_k = 8, 32, 1024, 8
    h = normal(227, (batch, d_model))
    w_teacher = normal(228, (d_model, vocab), scale=d_model**-0.5)
    w_student = normal(229, (d_model, vocab), scale=d_model**-0.5)

    def loss(h, w_teacher, w_student):
        t_probs = jax.nn.softmax(h @ w_teacher, axis=-1)
        t_top, t_ids = lax.top_k(t_probs, top_k)
        t_top = t_top / t_top.sum(-1, keepdims=True)
        s_logp = jax.nn.log_softmax(h @ w_student, axis=-1)
        return -jnp.mean(jnp.sum(t_top * jnp.take_along_axis(s_logp, t_ids, axis=-1), axis=-1))

    return _case(
        "nm_topk_distill_loss",
        loss,
        (h, w_teacher, w_student),
        "top-k knowledge distillation: renormalised teacher top-k probs reduced into a scalar loss",
    )


def make_nm_topk_sae() -> ZooCase:
    """TopK sparse autoencoder: encoder pre-acts, top-k latents, ReLU, scatter back, decode."""
    num_tokens, d_model, num_latents, top_k = 16, 32, 256, 8
    x = normal(230, (num_tokens, d_model))
    w_enc = normal(231, (d_model, num_latents), scale=d_model**-0.5)
    b_enc = jnp.asarray(np.zeros((num_latents,), np.float32))
    w_dec = normal(232, (num_latents, d_model), scale=num_latents**-0.5)

    def sae(x, w_enc, b_enc, w_dec):
        pre = x @ w_enc + b_enc
        vals, idx = lax.top_k(pre, top_k)
        acts = jnp.zeros_like(pre).at[jnp.arange(num_tokens)[:, None], idx].set(jax.nn.relu(vals))
        return acts @ w_dec, acts

    return _case(
        "nm_topk_sae",
        sae,
        (x, w_enc, b_enc, w_dec),
        "TopK SAE: relu of raw top-k pre-activations scattered into a sparse code, no softmax",
    )


def _shard_map_top_k(top_k: int):
    """top_k inside a one-device shard_map, its values and ids returned as they are."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))
    spec = jax.sharding.PartitionSpec()
    body = lambda s: tuple(lax.top_k(s, top_k))  # noqa: E731
    return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=(spec, spec))


def make_nm_shard_map_raw_topk() -> ZooCase:
    """Raw projections handed to a shard_map whose top-k values are used as they are: no score
    function here nor where the body's caller computes its input."""
    x = normal(233, (16, 32))
    w = normal(234, (32, 8), scale=32**-0.5)
    return _case(
        "nm_shard_map_raw_topk",
        lambda x, w: _shard_map_top_k(2)(x @ w),
        (x, w),
        "top-k of raw projections in a shard_map: a bare top_k, no scores outside either",
    )


def make_nm_shard_map_softmax_over_tokens() -> ZooCase:
    """A softmax over the tokens outside a shard_map, top-k over the other axis inside it."""
    x = normal(235, (16, 32))
    w = normal(236, (32, 8), scale=32**-0.5)
    return _case(
        "nm_shard_map_softmax_over_tokens",
        lambda x, w: _shard_map_top_k(2)(jax.nn.softmax(x @ w, axis=0)),
        (x, w),
        "the scores outside are normalised over the tokens, not over the candidates the top-k picks",
    )


def make_nm_strided_groups() -> ZooCase:
    """DS-V3-like group-limited routing but groups are STRIDED (expert e in group e % G), not consecutive."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    n_group, topk_group = 4, 2
    x = normal(233, (num_tokens, d_model))
    w = normal(234, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(235, (num_experts,), scale=0.05)

    def fn(x, w, bias):
        scores = jax.nn.sigmoid(x @ w)
        sc = scores + bias
        # [T, E/G, G]: group g holds experts g, g+G, g+2G, ...
        grouped = sc.reshape(num_tokens, num_experts // n_group, n_group)
        gs = lax.top_k(jnp.swapaxes(grouped, 1, 2), 2)[0].sum(-1)  # [T, G]
        gi = lax.top_k(gs, topk_group)[1]
        gm = jax.nn.one_hot(gi, n_group).sum(1)  # [T, G]
        em = jnp.tile(gm, (1, num_experts // n_group))  # expert e -> group e % G
        sc = jnp.where(em > 0, sc, 0.0)
        ids = lax.top_k(sc, top_k)[1]
        wt = jnp.take_along_axis(scores, ids, -1)
        return 2.5 * wt / (wt.sum(-1, keepdims=True) + 1e-20), ids

    return _case(
        "nm_strided_groups",
        fn,
        (x, w, bias),
        "group-limited routing over strided (interleaved) groups; fused op's groups are consecutive",
    )


def make_nm_strided_groups_per_group_layout() -> ZooCase:
    """The per-group-layout mask of a group-limited router, but over [T, E/G, G]: group g holds the
    strided experts g, g + G, ...; the flags broadcast along the middle axis."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    n_group, topk_group = 4, 2
    x = normal(248, (num_tokens, d_model))
    w = normal(249, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        scores = jax.nn.sigmoid(x @ w)
        grouped = scores.reshape(num_tokens, num_experts // n_group, n_group)  # [T, E/G, G]
        gs = lax.top_k(jnp.swapaxes(grouped, 1, 2), 2)[0].sum(-1)  # [T, G]
        gm = jax.nn.one_hot(lax.top_k(gs, topk_group)[1], n_group).sum(1)  # [T, G]
        choice = jnp.where(gm[:, None, :] > 0, grouped, -jnp.inf).reshape(num_tokens, num_experts)
        ids = lax.top_k(choice, top_k)[1]
        wt = jnp.take_along_axis(scores, ids, -1)
        return wt / wt.sum(-1, keepdims=True), ids

    return _case(
        "nm_strided_groups_per_group_layout",
        fn,
        (x, w),
        "strided groups masked in a [T, E/G, G] layout; a fused router's groups are consecutive",
    )


def make_nm_group_mask_per_expert_flags() -> ZooCase:
    """Masked in the [T, G, E/G] layout, but the flags differ within a group (an expert-level
    threshold), so whole groups are not what is kept."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 32, 4
    n_group, topk_group = 4, 2
    x = normal(250, (num_tokens, d_model))
    w = normal(251, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        scores = jax.nn.sigmoid(x @ w)
        grouped = scores.reshape(num_tokens, n_group, -1)
        gs = lax.top_k(grouped, 2)[0].sum(-1)
        gm = jax.nn.one_hot(lax.top_k(gs, topk_group)[1], n_group).sum(1)  # [T, G]
        keep = (gm[:, :, None] > 0) & (grouped > 0.3)
        choice = jnp.where(keep, grouped, -jnp.inf).reshape(num_tokens, num_experts)
        ids = lax.top_k(choice, top_k)[1]
        wt = jnp.take_along_axis(scores, ids, -1)
        return wt / wt.sum(-1, keepdims=True), ids

    return _case(
        "nm_group_mask_per_expert_flags",
        fn,
        (x, w),
        "per-group-layout mask ANDed with a per-expert threshold: not a choice of whole groups",
    )


def make_nm_attention_one_sequence() -> ZooCase:
    """Sparse attention over one unbatched sequence: softmax(q @ k.T) then the top-4 keys per query."""
    seq, d_head, top_k = 16, 32, 4
    x = normal(236, (seq, d_head))
    wq = normal(237, (d_head, d_head), scale=d_head**-0.5)
    wk = normal(238, (d_head, d_head), scale=d_head**-0.5)

    def attn(x, wq, wk):
        q, k = x @ wq, x @ wk
        probs = jax.nn.softmax(q @ k.T / np.sqrt(d_head).astype(np.float32), axis=-1)
        top_p, top_i = lax.top_k(probs, top_k)
        return top_p / top_p.sum(-1, keepdims=True), top_i

    return _case(
        "nm_attention_one_sequence",
        attn,
        (x, wq, wk),
        "top-k over the keys of one sequence: scores are a product of two activations of the same tokens",
    )


def make_nm_token_similarity_topk() -> ZooCase:
    """Token-to-token similarity (x @ x.T), softmax, top-3 neighbours: the candidates are the tokens."""
    num_tokens, d_model, top_k = 16, 32, 3
    x = normal(239, (num_tokens, d_model))

    def neighbours(x):
        probs = jax.nn.softmax(x @ x.T, axis=-1)
        return lax.top_k(probs, top_k)

    return _case(
        "nm_token_similarity_topk",
        neighbours,
        (x,),
        "top-k neighbours among the tokens themselves (x @ x.T): no fixed set of experts",
    )


def make_nm_group_mask_clip_floor() -> ZooCase:
    """Ling-style group routing whose float mask is clipped to [0.5, 1]: every entry is non-zero, so the
    `where` keeps all experts and the group choice has no effect on the ids."""
    num_tokens, d_model, num_experts, top_k, n_group, topk_group = 16, 32, 32, 4, 4, 2
    x = normal(240, (num_tokens, d_model))
    w = normal(241, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        scores = jax.nn.sigmoid(x @ w)
        group_scores = scores.reshape(num_tokens, n_group, -1).max(-1)
        group_idx = lax.top_k(group_scores, topk_group)[1]
        group_mask = jnp.clip(jax.nn.one_hot(group_idx, n_group).sum(1), 0.5, 1.0)
        mask = jnp.broadcast_to(group_mask[:, :, None], (num_tokens, n_group, num_experts // n_group))
        masked = jnp.where(mask.reshape(num_tokens, num_experts), scores, 0.0)
        ids = lax.top_k(masked, top_k)[1]
        wt = jnp.take_along_axis(scores, ids, -1)
        return wt / wt.sum(-1, keepdims=True), ids

    return _case(
        "nm_group_mask_clip_floor",
        fn,
        (x, w),
        "the group mask is clipped to [0.5, 1]: never zero, so no group is dropped (not group-limited)",
    )


def make_nm_group_score_max_plus_min_masked() -> ZooCase:
    """Group score = max + max of the rest with the *argmin* masked: not the sum of the group's top two."""
    num_tokens, d_model, num_experts, top_k, n_group, topk_group = 16, 32, 32, 4, 4, 2
    x = normal(242, (num_tokens, d_model))
    w = normal(243, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(244, (num_experts,), scale=0.05)

    def fn(x, w, bias):
        scores = jax.nn.sigmoid(x @ w)
        choice = scores + bias
        grouped = choice.reshape(num_tokens, n_group, -1)
        at_min = jnp.arange(grouped.shape[-1]) == jnp.argmin(grouped, axis=-1)[..., None]
        group_scores = grouped.max(-1) + jnp.where(at_min, -jnp.inf, grouped).max(-1)
        group_idx = lax.top_k(group_scores, topk_group)[1]
        group_mask = jax.nn.one_hot(group_idx, n_group).sum(1)
        mask = jnp.broadcast_to(group_mask[:, :, None], grouped.shape).reshape(choice.shape)
        ids = lax.top_k(jnp.where(mask > 0, choice, -jnp.inf), top_k)[1]
        wt = jnp.take_along_axis(scores, ids, -1)
        return wt / (wt.sum(-1, keepdims=True) + 1e-20), ids

    return _case(
        "nm_group_score_max_plus_min_masked",
        fn,
        (x, w, bias),
        "group score masks the argmin, not the argmax: 2 x max, not the top-2 sum a fused router uses",
    )


def make_nm_group_score_sum_of_sorted_three() -> ZooCase:
    """Ling-style groups of three experts scored by the sum of the whole sorted group: all three, not
    the top two (a group of two would be its own top two)."""
    num_tokens, d_model, num_experts, top_k, n_group, topk_group = 16, 32, 24, 4, 8, 4
    x = normal(247, (num_tokens, d_model))
    w = normal(248, (d_model, num_experts), scale=d_model**-0.5)
    bias = normal(249, (num_experts,), scale=0.05)

    def fn(x, w, bias):
        scores = jax.nn.sigmoid(x @ w)
        choice = scores + bias
        grouped = choice.reshape(num_tokens, n_group, -1)
        group_scores = jnp.sort(grouped, axis=-1).sum(-1)
        group_idx = lax.top_k(group_scores, topk_group)[1]
        keep = jnp.repeat(jax.nn.one_hot(group_idx, n_group).sum(1) > 0, num_experts // n_group, axis=-1)
        ids = lax.top_k(jnp.where(keep, choice, -jnp.inf), top_k)[1]
        wt = jnp.take_along_axis(scores, ids, -1)
        return wt / (wt.sum(-1, keepdims=True) + 1e-20), ids

    return _case(
        "nm_group_score_sum_of_sorted_three",
        fn,
        (x, w, bias),
        "groups of three experts scored by the sum of the sorted group: all three, not the top-2 sum",
    )


def make_nm_topk_sorts_all_candidates() -> ZooCase:
    """top_k with k equal to the number of candidates: softmax probabilities sorted, nothing dropped."""
    num_tokens, d_model, num_classes = 16, 32, 4
    x = normal(245, (num_tokens, d_model))
    w = normal(246, (d_model, num_classes), scale=d_model**-0.5)

    def fn(x, w):
        return lax.top_k(jax.nn.softmax(x @ w, axis=-1), num_classes)

    return _case(
        "nm_topk_sorts_all_candidates",
        fn,
        (x, w),
        "top-4 of 4 class probabilities: a ranking of all candidates, no choice among experts",
    )


def make_nm_topk_sorts_all_classes_then_gathers() -> ZooCase:
    """All 4 class probabilities ranked, then each class's embedding gathered in rank order: the ids
    index exactly the 4 candidates they rank, so nothing is chosen."""
    num_tokens, d_model, num_classes = 16, 32, 4
    x = normal(252, (num_tokens, d_model))
    w = normal(253, (d_model, num_classes), scale=d_model**-0.5)
    table = normal(254, (num_classes, d_model))

    def fn(x, w, table):
        probs, ranked = lax.top_k(jax.nn.softmax(x @ w, axis=-1), num_classes)
        return jnp.einsum("tc,tcd->td", probs, table[ranked])

    return _case(
        "nm_topk_sorts_all_classes_then_gathers",
        fn,
        (x, w, table),
        "top-4 of 4 classes, ids gathering from the 4-row class table: a ranking, no choice",
    )


def make_nm_topk_sorts_all_then_indexes_activations() -> ZooCase:
    """All 4 scores of each token ranked, then the ranks index rows of the tokens themselves (16 rows,
    more than the 4 candidates): the indexed array is the ranked data's own, not a table of experts."""
    num_tokens, d_model, num_classes = 16, 32, 4
    x = normal(255, (num_tokens, d_model))
    w = normal(256, (d_model, num_classes), scale=d_model**-0.5)

    def fn(x, w):
        probs, ranked = lax.top_k(jax.nn.softmax(x @ w, axis=-1), num_classes)
        return jnp.einsum("tc,tcd->td", probs, x[ranked])

    return _case(
        "nm_topk_sorts_all_then_indexes_activations",
        fn,
        (x, w),
        "top-4 of 4 scores whose ranks index rows of the same tokens: a ranking, no expert table",
    )


def make_nm_argsort_descending_reversed() -> ZooCase:
    """argsort(p)[:, ::-1][:, :k]: the largest first, but tied experts come out higher id first."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(247, (num_tokens, d_model))
    half = normal(248, (d_model, num_experts // 2), scale=d_model**-0.5)
    w = jnp.concatenate([half, half], axis=1)  # experts e and e+4 tie exactly

    def fn(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        ids = jnp.argsort(probs, axis=-1)[:, ::-1][:, :top_k]
        weights = jnp.take_along_axis(probs, ids, axis=-1)
        return weights / weights.sum(-1, keepdims=True), ids

    return _case(
        "nm_argsort_descending_reversed",
        fn,
        (x, w),
        "reversed ascending argsort breaks ties toward the higher id; lax.top_k toward the lower",
    )


def make_nm_argsort_sigmoid() -> ZooCase:
    """argsort(-sigmoid)[:, :k]: a NaN score sorts last here but first in lax.top_k."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 16, 4
    x = normal(249, (num_tokens, d_model))
    w = normal(250, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        scores = jax.nn.sigmoid(x @ w)
        ids = jnp.argsort(-scores, axis=-1)[:, :top_k]
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        return weights / weights.sum(-1, keepdims=True), ids

    return _case(
        "nm_argsort_sigmoid",
        fn,
        (x, w),
        "argsort of sigmoid scores: one NaN logit makes one NaN score, ordered last by sort, first by top_k",
    )


def make_nm_argsort_descending_logits() -> ZooCase:
    """argsort(logits, descending=True)[:, :k], softmax over the k: a sort ranks -0.0 and +0.0 as equal
    (and every NaN as the largest), lax.top_k puts +0.0 first (and -NaN last)."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(251, (num_tokens, d_model))
    w = normal(252, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        logits = x @ w
        ids = jnp.argsort(logits, axis=-1, descending=True)[:, :top_k]
        return jax.nn.softmax(jnp.take_along_axis(logits, ids, axis=-1), axis=-1), ids

    return _case(
        "nm_argsort_descending_logits",
        fn,
        (x, w),
        "descending argsort of raw logits: a row whose best two are -0.0 and +0.0 orders them by index "
        "there, +0.0 first in lax.top_k",
    )


def _masked_probs_router(seed, gates_of):
    """Top-2 of the logits; the weights laid out densely by gates_of(logits, mask of the ids)."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 8, 2
    x = normal(seed, (num_tokens, d_model))
    w = normal(seed + 1, (d_model, num_experts), scale=d_model**-0.5)

    def fn(x, w):
        logits = x @ w
        _, ids = jax.lax.top_k(logits, top_k)
        mask = jax.nn.one_hot(ids, num_experts).sum(-2) > 0
        return gates_of(logits, mask), ids

    return fn, (x, w)


def make_nm_dense_masked_softmax_not_renormalised() -> ZooCase:
    """where(mask, softmax(logits), 0) over the top-2 of the logits, not renormalised: the weights are
    the full softmax's probabilities at ids chosen on the logits (not a softmax over the chosen two)."""
    fn, args = _masked_probs_router(253, lambda lg, m: jnp.where(m, jax.nn.softmax(lg, axis=-1), 0.0))
    return _case("nm_dense_masked_softmax_not_renormalised", fn, args,
                 "masked full-softmax probabilities without renormalisation: not the softmax over the k")


def make_nm_dense_masked_softmax_finite_fill() -> ZooCase:
    """softmax(where(mask, logits, -1e9)): the experts off the choice get exp(-1e9 - max), not provably 0."""
    fn, args = _masked_probs_router(255, lambda lg, m: jax.nn.softmax(jnp.where(m, lg, -1e9), axis=-1))
    return _case("nm_dense_masked_softmax_finite_fill", fn, args,
                 "a masked softmax with a finite fill: the experts off the choice are not provably 0")


NEAR_MISSES = [
    make_nm_lm_topk_sampling,
    make_nm_top_p_sampling,
    make_nm_attention_topk_keys,
    make_nm_topk_values_reused_raw,
    make_nm_renorm_over_tokens,
    make_nm_mismatched_k,
    make_nm_argmax_classifier,
    make_nm_sigmoid_biased_weights,
    make_nm_expert_choice,
    make_nm_softmax_over_tokens,
    make_nm_knn_retrieval,
    make_nm_topk_distill_loss,
    make_nm_topk_sae,
    make_nm_shard_map_raw_topk,
    make_nm_shard_map_softmax_over_tokens,
    make_nm_strided_groups,
    make_nm_strided_groups_per_group_layout,
    make_nm_group_mask_per_expert_flags,
    make_nm_attention_one_sequence,
    make_nm_token_similarity_topk,
    make_nm_group_mask_clip_floor,
    make_nm_group_score_max_plus_min_masked,
    make_nm_group_score_sum_of_sorted_three,
    make_nm_topk_sorts_all_candidates,
    make_nm_topk_sorts_all_classes_then_gathers,
    make_nm_topk_sorts_all_then_indexes_activations,
    make_nm_argsort_descending_reversed,
    make_nm_argsort_sigmoid,
    make_nm_argsort_descending_logits,
    make_nm_dense_masked_softmax_not_renormalised,
    make_nm_dense_masked_softmax_finite_fill,
]
