"""Programs that look like MoE blocks but are not, or that a fused MoE op must decline.

Every entry of ``NEAR_MOE_MISSES`` is a zero-argument ``make_<name>()`` returning a
:class:`ZooCase` with family ``"near-miss"``, ``expect == {}`` and ``count == 0``; ``note`` says why
it is not a (fusable) MoE block.

One entry is special: ``nm_moe_unstacked_expert_list`` *is* semantically a MoE block, but its
expert weights are separate arrays (a python list), not stacked on an expert axis.  A fuser may
decline it (the safe answer) or take the per-expert arrays as they are; either way the program's
output must not change.  Its name is listed in ``MAY_FUSE``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import NEAR_MISS, ZooCase, normal

MAY_FUSE = frozenset({"nm_moe_unstacked_expert_list"})


def _case(name, fn, args, note) -> ZooCase:
    return ZooCase(name, fn, args, NEAR_MISS, {}, count=0, note=note)


def _w(seed, shape, fan_in, gain=1.0):
    return normal(seed, shape, scale=gain * fan_in**-0.5)


def _experts(seed, num_experts, d_model, d_ff):
    return (
        _w(seed, (num_experts, d_model, d_ff), d_model),
        _w(seed + 1, (num_experts, d_model, d_ff), d_model),
        _w(seed + 2, (num_experts, d_ff, d_model), d_ff),
    )


def make_nm_moe_combine_first_weight_only() -> ZooCase:
    """Top-2 routing; both experts computed, but the combine uses only the first of the k weights."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(2000, (num_tokens, d_model))
    wr = _w(2001, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2002, num_experts, d_model, d_ff)

    def fn(x, wr, w_gate, w_up, w_down):
        probs = jax.nn.softmax(x @ wr, axis=-1)
        w, ids = lax.top_k(probs, top_k)
        w = w / w.sum(-1, keepdims=True)
        g = jnp.einsum("td,tkdf->tkf", x, w_gate[ids])
        u = jnp.einsum("td,tkdf->tkf", x, w_up[ids])
        y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, w_down[ids])  # [T, K, D]
        return jnp.einsum("tkd,t->td", y, w[:, 0])  # every expert weighted by the FIRST weight

    return _case(
        "nm_moe_combine_first_weight_only",
        fn,
        (x, wr, w_gate, w_up, w_down),
        "router gives k=2 weights, combine is w[:,0] * (y_0 + y_1): weights do not match the ids they "
        "weight, so no sum_j w_j * FFN_{id_j}(x) exists",
    )


def make_nm_moe_uniform_combine() -> ZooCase:
    """Dense all-expert einsum; top-2 ids from the router but combine weights are a constant 1/k."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 2
    x = normal(2010, (num_tokens, d_model))
    wr = _w(2011, (d_model, num_experts), d_model)
    w1, w3, w2 = _experts(2012, num_experts, d_model, d_ff)

    def fn(x, wr, w1, w2, w3):
        probs = jax.nn.softmax(x @ wr, axis=-1)
        _, ids = lax.top_k(probs, top_k)
        combine = jax.nn.one_hot(ids, num_experts).sum(1) / top_k  # [T, E], router weights discarded
        gating = jnp.einsum("TD,EDF->TEF", x, w1)
        up = jnp.einsum("TD,EDF->TEF", x, w3)
        expert_out = jnp.einsum("TEF,EFD->TED", jax.nn.silu(gating) * up, w2)
        return jnp.einsum("TED,TE->TD", expert_out, combine)

    return _case(
        "nm_moe_uniform_combine",
        fn,
        (x, wr, w1, w2, w3),
        "combine weights are uniform 1/k, not the router's top-k probabilities: a fused router+MoE op "
        "that reuses the router's weights would be wrong (a fusion must take the weights it sees)",
    )


def make_nm_moe_unstacked_expert_list() -> ZooCase:
    """Mixture over a python list of separate per-expert weight arrays (not stacked on an E axis)."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 4, 2
    x = normal(2020, (num_tokens, d_model))
    wr = _w(2021, (d_model, num_experts), d_model)
    experts = [
        {
            "w_in": _w(2022 + 3 * e, (d_model, d_ff), d_model),
            "w_gate": _w(2023 + 3 * e, (d_model, d_ff), d_model),
            "w_out": _w(2024 + 3 * e, (d_ff, d_model), d_ff),
        }
        for e in range(num_experts)
    ]

    def fn(x, wr, experts):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        w = w / w.sum(-1, keepdims=True)
        out = jnp.zeros_like(x)
        for e, p in enumerate(experts):
            we = jnp.sum(w * (ids == e), axis=-1)
            out = out + we[:, None] * ((jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_in"])) @ p["w_out"])
        return out

    return _case(
        "nm_moe_unstacked_expert_list",
        fn,
        (x, wr, experts),
        "SEMANTICALLY A MoE (top-2 of 4, SwiGLU, loop over experts) but the expert weights are 4 separate "
        "arrays each, not stacked [E,D,F]; a fuser must take them as they are or decline (see MAY_FUSE)",
    )


def make_nm_moe_expert_outputs_escape() -> ZooCase:
    """Dense MoE whose per-expert outputs [T,E,D] are also returned (used elsewhere)."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(2040, (num_tokens, d_model))
    wr = _w(2041, (d_model, num_experts), d_model)
    w1, w3, w2 = _experts(2042, num_experts, d_model, d_ff)

    def fn(x, wr, w1, w2, w3):
        probs = jax.nn.softmax(x @ wr, axis=-1)
        w, ids = lax.top_k(probs, top_k)
        w = w / w.sum(-1, keepdims=True)
        combine = jnp.sum(jax.nn.one_hot(ids, num_experts) * w[..., None], axis=1)
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w1)) * jnp.einsum("td,edf->tef", x, w3)
        expert_out = jnp.einsum("tef,efd->ted", h, w2)
        out = jnp.einsum("ted,te->td", expert_out, combine)
        return out, expert_out

    return _case(
        "nm_moe_expert_outputs_escape",
        fn,
        (x, wr, w1, w2, w3),
        "the per-expert outputs [T,E,D] of all experts are a program output too; a fused op does not "
        "produce them, so replacing the block would still need the dense computation (decline)",
    )


def make_nm_moe_soft_dense_mixture() -> ZooCase:
    """Dense (soft) mixture: softmax over all experts, every expert weighted, no top-k."""
    num_tokens, d_model, d_ff, num_experts = 16, 32, 64, 8
    x = normal(2050, (num_tokens, d_model))
    wr = _w(2051, (d_model, num_experts), d_model)
    w1, w3, w2 = _experts(2052, num_experts, d_model, d_ff)

    def fn(x, wr, w1, w2, w3):
        gates = jax.nn.softmax(x @ wr, axis=-1)  # [T, E], all non-zero
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w1)) * jnp.einsum("td,edf->tef", x, w3)
        y = jnp.einsum("tef,efd->ted", h, w2)
        return jnp.einsum("ted,te->td", y, gates)

    return _case(
        "nm_moe_soft_dense_mixture",
        fn,
        (x, wr, w1, w2, w3),
        "soft mixture of experts: dense softmax weights over all 8 experts, no top-k selection; "
        "there is no sparse routing to exploit",
    )


def make_nm_moe_mha_heads() -> ZooCase:
    """Multi-head self-attention: stacked per-head weights [H,D,Dh] look like expert weights [E,D,F]."""
    batch, seq, d_model, num_heads, d_head = 2, 16, 32, 8, 16
    x = normal(2060, (batch, seq, d_model))
    wq = _w(2061, (num_heads, d_model, d_head), d_model)
    wk = _w(2062, (num_heads, d_model, d_head), d_model)
    wv = _w(2063, (num_heads, d_model, d_head), d_model)
    wo = _w(2064, (num_heads, d_head, d_model), d_head * num_heads)

    def fn(x, wq, wk, wv, wo):
        q = jnp.einsum("bsd,hdk->bhsk", x, wq)
        k = jnp.einsum("bsd,hdk->bhsk", x, wk)
        v = jnp.einsum("bsd,hdk->bhsk", x, wv)
        scores = jnp.einsum("bhqk,bhsk->bhqs", q, k) / jnp.sqrt(float(d_head))
        mask = jnp.tril(jnp.ones((seq, seq), bool))
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        ctx = jnp.einsum("bhqs,bhsk->bhqk", probs, v)
        return jnp.einsum("bhqk,hkd->bqd", ctx, wo)

    return _case(
        "nm_moe_mha_heads",
        fn,
        (x, wq, wk, wv, wo),
        "causal multi-head attention: head axis H on [H,D,Dh] weights and a softmax, but the softmax "
        "is over key positions, every head is used, no router and no top-k",
    )


def make_nm_moe_topk_attention() -> ZooCase:
    """Top-k sparse attention per head: top_k over key scores, softmax over k, gather values."""
    num_tokens, d_model, num_heads, d_head, top_k = 32, 32, 4, 8, 4
    x = normal(2070, (num_tokens, d_model))
    wq = _w(2071, (num_heads, d_model, d_head), d_model)
    wk = _w(2072, (num_heads, d_model, d_head), d_model)
    wv = _w(2073, (num_heads, d_model, d_head), d_model)
    wo = _w(2074, (num_heads, d_head, d_model), d_head * num_heads)

    def fn(x, wq, wk, wv, wo):
        q = jnp.einsum("td,hdf->htf", x, wq)
        k = jnp.einsum("td,hdf->htf", x, wk)
        v = jnp.einsum("td,hdf->htf", x, wv)
        scores = jnp.einsum("hqf,hsf->hqs", q, k)  # [H, T, T]
        top_s, top_i = lax.top_k(scores, top_k)  # k keys per query
        p = jax.nn.softmax(top_s, axis=-1)
        v_sel = jax.vmap(lambda vh, ih: vh[ih])(v, top_i)  # [H, T, k, Dh]
        ctx = jnp.einsum("hqk,hqkf->hqf", p, v_sel)
        return jnp.einsum("hqf,hfd->qd", ctx, wo)

    return _case(
        "nm_moe_topk_attention",
        fn,
        (x, wq, wk, wv, wo),
        "top-k attention: lax.top_k + softmax over k + per-query gather, but the top-k picks key "
        "positions (data rows), not experts; weights are stacked per head, not per expert",
    )


def make_nm_moe_weights_inside_activation() -> ZooCase:
    """Router weights scale the expert's gate pre-activation instead of the expert output."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(2080, (num_tokens, d_model))
    wr = _w(2081, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2082, num_experts, d_model, d_ff)

    def fn(x, wr, w_gate, w_up, w_down):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        w = w / w.sum(-1, keepdims=True)
        g = jnp.einsum("td,tkdf->tkf", x, w_gate[ids]) * w[..., None]  # weight before the nonlinearity
        u = jnp.einsum("td,tkdf->tkf", x, w_up[ids])
        y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, w_down[ids])
        return y.sum(axis=1)

    return _case(
        "nm_moe_weights_inside_activation",
        fn,
        (x, wr, w_gate, w_up, w_down),
        "the routing weight multiplies the gate projection before silu: silu(w*g)*u != w*(silu(g)*u), "
        "so the result is not sum_j w_j * FFN_j(x)",
    )


def make_nm_moe_ids_from_other_router() -> ZooCase:
    """Weights from router A, expert ids from a different router B."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(2090, (num_tokens, d_model))
    wr_a = _w(2091, (d_model, num_experts), d_model)
    wr_b = _w(2092, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2093, num_experts, d_model, d_ff)

    def fn(x, wr_a, wr_b, w_gate, w_up, w_down):
        w, _ = lax.top_k(jax.nn.softmax(x @ wr_a, axis=-1), top_k)
        w = w / w.sum(-1, keepdims=True)
        _, ids = lax.top_k(x @ wr_b, top_k)
        combine = jnp.zeros((num_tokens, num_experts)).at[jnp.arange(num_tokens)[:, None], ids].add(w)
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)
        return jnp.einsum("ted,te->td", jnp.einsum("tef,efd->ted", h, w_down), combine)

    return _case(
        "nm_moe_ids_from_other_router",
        fn,
        (x, wr_a, wr_b, w_gate, w_up, w_down),
        "weights are router A's top-k probabilities but the experts are router B's top-k ids; "
        "no single router produces both (fusing with either router is wrong)",
    )


def make_nm_moe_expert_tanh_output() -> ZooCase:
    """Experts are not a plain FFN: each expert output goes through tanh before weighting."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(2100, (num_tokens, d_model))
    wr = _w(2101, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2102, num_experts, d_model, d_ff)

    def fn(x, wr, w_gate, w_up, w_down):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        w = w / w.sum(-1, keepdims=True)
        flat = ids.reshape(-1)
        perm = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=num_experts)
        xs = x[perm // top_k]
        h = jax.nn.silu(lax.ragged_dot(xs, w_gate, sizes)) * lax.ragged_dot(xs, w_up, sizes)
        y = jnp.tanh(lax.ragged_dot(h, w_down, sizes))  # extra nonlinearity inside the expert
        y = y * w.reshape(-1)[perm][:, None]
        return jnp.zeros_like(x).at[perm // top_k].add(y)

    return _case(
        "nm_moe_expert_tanh_output",
        fn,
        (x, wr, w_gate, w_up, w_down),
        "sorted ragged_dot MoE whose expert is tanh(down(swiglu(x))): the expert function is not one of "
        "the FFN forms a fused op computes, so it must decline",
    )


def make_nm_moe_expert_choice() -> ZooCase:
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens."""
    num_tokens, d_model, d_ff, num_experts = 32, 32, 64, 8
    capacity = 8  # tokens per expert
    x = normal(2110, (num_tokens, d_model))
    wr = _w(2111, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2112, num_experts, d_model, d_ff)

    def fn(x, wr, w_gate, w_up, w_down):
        probs = jax.nn.softmax(x @ wr, axis=-1)  # [T, E]
        g, token_idx = lax.top_k(probs.T, capacity)  # [E, C]: top-k over TOKENS for each expert
        xe = x[token_idx]  # [E, C, D]
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, w_gate)) * jnp.einsum("ecd,edf->ecf", xe, w_up)
        ye = jnp.einsum("ecf,efd->ecd", h, w_down) * g[..., None]
        return jnp.zeros_like(x).at[token_idx.reshape(-1)].add(ye.reshape(-1, d_model))

    return _case(
        "nm_moe_expert_choice",
        fn,
        (x, wr, w_gate, w_up, w_down),
        "expert-choice routing: top-k runs over the token axis of probs.T, so a token may get 0 or many "
        "experts; not token-choice top-k MoE",
    )


def _sorted_block_on_rows(num_tokens, top_k, num_experts, spread_rows):
    """A sorted ragged_dot block whose token rows are `spread_rows(x)` [T * k, D] taken at the order."""

    def fn(x, wr, w_gate, w_up, w_down):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        flat = ids.reshape(-1)
        order = jnp.argsort(flat)
        rows = spread_rows(x)[order]
        sizes = jnp.bincount(flat, length=num_experts)
        h = jax.nn.silu(lax.ragged_dot(rows, w_gate, sizes)) * lax.ragged_dot(rows, w_up, sizes)
        y = lax.ragged_dot(h, w_down, sizes)[jnp.argsort(order)]
        return jnp.einsum("tkd,tk->td", y.reshape(num_tokens, top_k, -1), w)

    return fn


def make_nm_moe_tiled_rows() -> ZooCase:
    """Rows spread by jnp.tile instead of jnp.repeat: row i is token i % T, not i // k."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 2
    x = normal(2120, (num_tokens, d_model))
    wr = _w(2121, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2122, num_experts, d_model, d_ff)
    fn = _sorted_block_on_rows(num_tokens, top_k, num_experts, lambda x: jnp.tile(x, (top_k, 1)))
    return _case(
        "nm_moe_tiled_rows",
        fn,
        (x, wr, w_gate, w_up, w_down),
        "jnp.tile(x, (k, 1))[order]: each sorted row is token (order % T), not (order // k): the "
        "experts run on other tokens than the ones that chose them",
    )


def make_nm_moe_repeated_along_features() -> ZooCase:
    """jnp.repeat along the feature axis, reshaped to [T * k, D]: rows are halves of tokens."""
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 2
    x = normal(2130, (num_tokens, d_model))
    wr = _w(2131, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2132, num_experts, d_model, d_ff)
    fn = _sorted_block_on_rows(
        num_tokens, top_k, num_experts, lambda x: jnp.repeat(x, top_k, axis=1).reshape(-1, d_model)
    )
    return _case(
        "nm_moe_repeated_along_features",
        fn,
        (x, wr, w_gate, w_up, w_down),
        "jnp.repeat(x, k, axis=1).reshape(T * k, D): row 2t is x[t, :D/2] repeated, not token t",
    )


def _per_expert_loop(seed, variant):
    """A loop over 4 experts with arrays of their own (top-2 of 4, SwiGLU), each expert's weight the sum
    over the two slots written out, with one deliberate deviation."""
    num_tokens, d_model, d_ff, num_experts = 16, 32, 64, 4
    x = normal(seed, (num_tokens, d_model))
    wr = _w(seed + 1, (d_model, num_experts), d_model)
    experts = [
        (_w(seed + 2 + 3 * e, (d_model, d_ff), d_model), _w(seed + 3 + 3 * e, (d_model, d_ff), d_model),
         _w(seed + 4 + 3 * e, (d_ff, d_model), d_ff))
        for e in range(num_experts)
    ]
    if variant == "shapes_differ":  # expert 2 is narrower: F = 48
        experts[2] = tuple(a[:, :48] if i < 2 else a[:48] for i, a in enumerate(experts[2]))

    def fn(x, wr, experts):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), 2)
        out = jnp.zeros_like(x)
        for e, (w_gate, w_up, w_down) in enumerate(experts):
            if variant == "columns_crossed":  # slot j's id with the other slot's weight
                we = jnp.where(ids[:, 0] == e, w[:, 1], 0.0) + jnp.where(ids[:, 1] == e, w[:, 0], 0.0)
            elif variant == "slot_missing":  # the second slot is never counted
                we = jnp.zeros((x.shape[0],)) + jnp.where(ids[:, 0] == e, w[:, 0], 0.0)
            else:
                we = jnp.where(ids[:, 0] == e, w[:, 0], 0.0) + jnp.where(ids[:, 1] == e, w[:, 1], 0.0)
            out = out + we[:, None] * ((jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down)
        return out

    return fn, (x, wr, experts)


def make_nm_moe_loop_weight_columns_crossed() -> ZooCase:
    fn, args = _per_expert_loop(2100, "columns_crossed")
    return _case(
        "nm_moe_loop_weight_columns_crossed",
        fn,
        args,
        "expert e's weight is where(ids[:, 0] == e, w[:, 1], 0) + where(ids[:, 1] == e, w[:, 0], 0): each "
        "slot's expert gets the other slot's weight",
    )


def make_nm_moe_loop_slot_missing() -> ZooCase:
    fn, args = _per_expert_loop(2120, "slot_missing")
    return _case(
        "nm_moe_loop_slot_missing",
        fn,
        args,
        "top-2 routing, but expert e's weight counts only the first slot (0 + where(ids[:, 0] == e, "
        "w[:, 0], 0)): the second choice never contributes",
    )


def make_nm_moe_loop_expert_shapes_differ() -> ZooCase:
    fn, args = _per_expert_loop(2140, "shapes_differ")
    return _case(
        "nm_moe_loop_expert_shapes_differ",
        fn,
        args,
        "experts with arrays of their own, but expert 2's hidden size is 48 where the others' is 64: no "
        "one FFN shape for all experts",
    )


NEAR_MOE_MISSES = [
    make_nm_moe_combine_first_weight_only,
    make_nm_moe_uniform_combine,
    make_nm_moe_unstacked_expert_list,
    make_nm_moe_expert_outputs_escape,
    make_nm_moe_soft_dense_mixture,
    make_nm_moe_mha_heads,
    make_nm_moe_topk_attention,
    make_nm_moe_weights_inside_activation,
    make_nm_moe_ids_from_other_router,
    make_nm_moe_expert_tanh_output,
    make_nm_moe_expert_choice,
    make_nm_moe_tiled_rows,
    make_nm_moe_repeated_along_features,
    make_nm_moe_loop_weight_columns_crossed,
    make_nm_moe_loop_slot_missing,
    make_nm_moe_loop_expert_shapes_differ,
]


# ---------------------------------------------------------------------------------------------
# capacity dispatch near misses: token-dropping blocks whose drop rule is NOT a fused kernel's
# ---------------------------------------------------------------------------------------------


def _gshard_like(seed, variant):
    """GShard-style top-2 capacity block over [G, S] tokens, with one deliberate deviation."""
    groups, group_size, d_model, d_ff, num_experts, capacity = 2, 16, 32, 64, 8, 4
    x = normal(seed, (groups, group_size, d_model))
    wg = _w(seed + 1, (d_model, num_experts), d_model, gain=2.0)
    wi = _w(seed + 2, (num_experts, d_model, d_ff), d_model)
    wo = _w(seed + 3, (num_experts, d_ff, d_model), d_ff)

    def fn(x, wg, wi, wo):
        probs = jax.nn.softmax(jnp.einsum("gsm,me->gse", x, wg), axis=-1)
        gates, idx = lax.top_k(probs, 2)
        gates = gates / gates.sum(-1, keepdims=True)
        m1 = jax.nn.one_hot(idx[..., 0], num_experts)
        m2 = jax.nn.one_hot(idx[..., 1], num_experts)
        if variant == "global_count":  # positions counted over all groups' tokens at once
            flat = m1.reshape(-1, num_experts)
            p1 = ((jnp.cumsum(flat, axis=0) - flat) * flat).reshape(m1.shape)
        else:
            p1 = (jnp.cumsum(m1, axis=1) - m1) * m1
        m1 = m1 * (p1 < capacity)
        if variant == "mixed_order":  # choice 2 offset by choice-1 counts up to the token only
            p2 = (jnp.cumsum(m2, axis=1) - m2 + jnp.cumsum(m1, axis=1)) * m2
        else:
            p2 = (jnp.cumsum(m2, axis=1) - m2 + m1.sum(1, keepdims=True)) * m2
        m2 = m2 * (p2 < capacity)
        w1, w2 = gates[..., 0], gates[..., 1]
        if variant == "swapped_weights":  # the second choice weighted by the first choice's gate
            w2 = w1
        c1 = (
            w1[..., None, None]
            * m1[..., None]
            * jax.nn.one_hot(p1.sum(-1).astype(jnp.int32), capacity)[..., None, :]
        )
        c2 = (
            w2[..., None, None]
            * m2[..., None]
            * jax.nn.one_hot(p2.sum(-1).astype(jnp.int32), capacity)[..., None, :]
        )
        combine = c1 + c2
        dispatch = (combine != 0).astype(x.dtype)
        xe = jnp.einsum("gsec,gsm->egcm", dispatch, x)
        h = jax.nn.relu(jnp.einsum("egcm,emh->egch", xe, wi))
        return jnp.einsum("gsec,egcm->gsm", combine, jnp.einsum("egch,ehm->egcm", h, wo))

    return fn, (x, wg, wi, wo)


def make_nm_moe_capacity_global_count() -> ZooCase:
    """Per-group buffers, but positions counted over all groups' tokens (cumsum over flattened G*S)."""
    fn, args = _gshard_like(2120, "global_count")
    return _case(
        "nm_moe_capacity_global_count",
        fn,
        args,
        "capacity per group of buffers, but first-choice positions are counted over all groups at once: "
        "later groups lose their slots; a fused kernel counting per group would keep them",
    )


def make_nm_moe_capacity_mixed_order() -> ZooCase:
    """Second choices offset by the first choices of earlier tokens only (neither slot- nor token-major)."""
    fn, args = _gshard_like(2130, "mixed_order")
    return _case(
        "nm_moe_capacity_mixed_order",
        fn,
        args,
        "first choices ranked among first choices only, second choices token-major: no single priority "
        "order, so which assignments are dropped is neither GShard's nor MaxText's",
    )


def make_nm_moe_capacity_swapped_weights() -> ZooCase:
    """Top-2 capacity block whose second choice is combined with the first choice's gate."""
    fn, args = _gshard_like(2140, "swapped_weights")
    return _case(
        "nm_moe_capacity_swapped_weights",
        fn,
        args,
        "the combine weights the second expert by the first expert's gate: not the router's weights",
    )


def make_nm_moe_capacity_one_based_slots() -> ZooCase:
    """Switch-style top-1 with 1-based positions: `<= C` keeps C tokens but slot C falls off one_hot."""
    num_tokens, d_model, d_ff, num_experts, capacity = 64, 32, 64, 16, 4
    x = normal(2150, (num_tokens, d_model))
    wr = _w(2151, (d_model, num_experts), d_model, gain=2.0)
    wi = _w(2152, (num_experts, d_model, d_ff), d_model)
    wo = _w(2153, (num_experts, d_ff, d_model), d_ff)

    def fn(x, wr, wi, wo):
        gate, idx = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), 1)
        mask = jax.nn.one_hot(idx[:, 0], num_experts, dtype=jnp.int32)
        prio = jnp.cumsum(mask, axis=0) * mask  # 1-based: the first token of an expert is 1
        mask = mask * (prio <= capacity)
        dispatch = jax.nn.one_hot(prio, capacity, dtype=jnp.int32) * mask[..., None]
        combine = dispatch.astype(jnp.float32) * gate[:, 0, None, None]
        xe = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)
        y = jnp.einsum("ecf,efd->ecd", jax.nn.relu(jnp.einsum("ecd,edf->ecf", xe, wi)), wo)
        return jnp.einsum("tec,ecd->td", combine, y)

    return _case(
        "nm_moe_capacity_one_based_slots",
        fn,
        (x, wr, wi, wo),
        "positions are 1-based (cumsum * mask, no -1): slot 0 is never used and each expert's C-th token "
        "is kept by `<= C` but falls off one_hot(., C), so only C-1 tokens per expert are processed",
    )


NEAR_MOE_MISSES += [
    make_nm_moe_capacity_global_count,
    make_nm_moe_capacity_mixed_order,
    make_nm_moe_capacity_swapped_weights,
    make_nm_moe_capacity_one_based_slots,
]


def make_nm_moe_picked_outputs_of_given_ids() -> ZooCase:
    """Every expert on every token, the k outputs picked by take_along_axis at the top-2 of NINE scores
    for eight experts: id 8 reads NaN (the gather's fill) where a fused op would add nothing."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(2600, (num_tokens, d_model))
    wr = _w(2604, (d_model, num_experts + 1), d_model)
    w_up = _w(2601, (num_experts, d_model, d_ff), d_model)
    w_down = _w(2602, (num_experts, d_ff, d_model), d_ff)

    def fn(x, wr, w_up, w_down):
        logits = (x @ wr).at[:, num_experts].add(-30.0)  # id 8 never chosen on these inputs, but could be
        w, ids = lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # ids in [0, 9)
        y = jnp.einsum("tef,efd->ted", jax.nn.relu(jnp.einsum("td,edf->tef", x, w_up)), w_down)
        return jnp.sum(jnp.take_along_axis(y, ids[:, :, None], axis=1) * w[:, :, None], axis=1)

    return _case(
        "nm_moe_picked_outputs_of_given_ids",
        fn,
        (x, wr, w_up, w_down),
        "ids choose among 9 scores for 8 experts: id 8 reads NaN from the gather, a fused op adds 0",
    )


def make_nm_moe_picked_outputs_along_tokens() -> ZooCase:
    """The dense outputs [E, T, D] picked along the TOKEN axis by top-k ids of experts: rows of other
    tokens, not the chosen experts' outputs."""
    num_tokens, d_model, d_ff, num_experts, top_k = 8, 32, 64, 8, 2
    x = normal(2610, (num_tokens, d_model))
    wr = _w(2611, (d_model, num_experts), d_model)
    w_up = _w(2612, (num_experts, d_model, d_ff), d_model)
    w_down = _w(2613, (num_experts, d_ff, d_model), d_ff)

    def fn(x, wr, w_up, w_down):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        y = jnp.einsum("etf,efd->etd", jax.nn.relu(jnp.einsum("td,edf->etf", x, w_up)), w_down)  # [E, T, D]
        return jnp.sum(jnp.take_along_axis(y, ids[:, :, None], axis=1) * w[:, :, None], axis=1)

    return _case(
        "nm_moe_picked_outputs_along_tokens",
        fn,
        (x, wr, w_up, w_down),
        "y is [E, T, D]: picking along axis 1 takes token ids[t, j]'s output of expert t, not expert "
        "ids[t, j]'s output for token t",
    )


NEAR_MOE_MISSES += [make_nm_moe_picked_outputs_of_given_ids, make_nm_moe_picked_outputs_along_tokens]


def make_nm_moe_slot_loop_swapped_columns() -> ZooCase:
    """A loop over the k slots (weights kept as [T, 1] columns, w[:, j:j+1]) whose slot j runs the
    expert of slot j but weighs it by the other slot's weight."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 48, 8, 2
    x = normal(2620, (num_tokens, d_model))
    wr = _w(2621, (d_model, num_experts), d_model)
    w1 = _w(2622, (num_experts, d_ff, d_model), d_model)
    w2 = _w(2623, (num_experts, d_model, d_ff), d_ff)

    def fn(x, wr, w1, w2):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        out = jnp.zeros_like(x)
        for j in range(top_k):
            h = jax.nn.relu(jnp.einsum("tfd,td->tf", w1[ids[:, j]], x))
            y = jnp.einsum("tdf,tf->td", w2[ids[:, j]], h)
            out = out + w[:, 1 - j : 2 - j] * y
        return out

    return _case(
        "nm_moe_slot_loop_swapped_columns",
        fn,
        (x, wr, w1, w2),
        "slot j's expert output is weighted by slot 1-j's weight: not a combine by the router's weights",
    )


NEAR_MOE_MISSES += [make_nm_moe_slot_loop_swapped_columns]


# ---------------------------------------------------------------------------------------------
# weights on the input (Llama4) near misses: blocks that scale the tokens before the experts and
# differ from `out[t] = sum_j FFN_{ids[t, j]}(w[t, j] * x[t])` by one detail
# ---------------------------------------------------------------------------------------------


def _scaled_sorted_block(num_tokens, top_k, num_experts, deviation):
    """A sorted top-k block whose rows are each token scaled by a routing weight, with one deviation."""

    def fn(x, wr, w_gate, w_up, w_down):
        top, ids = lax.top_k(x @ wr, top_k)
        w = jax.nn.sigmoid(top)
        flat = ids.reshape(-1)
        order = jnp.argsort(flat)
        inverse = jnp.argsort(order)
        if deviation == "other_weight":  # row i scaled by the weight of assignment inverse[i], not order[i]
            rows = x[order // top_k] * w.reshape(-1)[inverse][:, None]
        else:
            rows = (jnp.repeat(x, top_k, axis=0) * w.reshape(-1)[:, None])[order]
        sizes = jnp.bincount(flat, length=num_experts)
        h = jax.nn.silu(lax.ragged_dot(rows, w_gate, sizes)) * lax.ragged_dot(rows, w_up, sizes)
        y = lax.ragged_dot(h, w_down, sizes)[inverse].reshape(num_tokens, top_k, -1)
        if deviation == "also_weighted":  # the weights scale the tokens AND the outputs
            return jnp.einsum("tkd,tk->td", y, w)
        if deviation == "half_weights":  # the outputs summed with weight 0.5 each, not 1
            return jnp.einsum("tkd,tk->td", y, jnp.full((num_tokens, top_k), 0.5))
        return y.sum(axis=1)

    return fn


def _scaled_case(name, seed, deviation, note) -> ZooCase:
    num_tokens, d_model, d_ff, num_experts, top_k = 32, 32, 64, 8, 2
    x = normal(seed, (num_tokens, d_model))
    wr = _w(seed + 1, (d_model, num_experts), d_model, gain=2.0)
    w_gate, w_up, w_down = _experts(seed + 2, num_experts, d_model, d_ff)
    fn = _scaled_sorted_block(num_tokens, top_k, num_experts, deviation)
    return _case(name, fn, (x, wr, w_gate, w_up, w_down), note)


def make_nm_moe_weights_on_input_and_output() -> ZooCase:
    """Each sorted row is the token times its weight, and the outputs are weighted by it again."""
    return _scaled_case(
        "nm_moe_weights_on_input_and_output", 2140, "also_weighted",
        "sum_j w_j * FFN_j(w_j * x): the weight twice; neither sum_j w_j FFN_j(x) nor sum_j FFN_j(w_j x)",
    )


def make_nm_moe_input_scaled_by_other_weight() -> ZooCase:
    """Sorted row i is token order[i] // k, scaled by the weight of another assignment (inverse[i])."""
    return _scaled_case(
        "nm_moe_input_scaled_by_other_weight", 2150, "other_weight",
        "rows x[order // k] * w.reshape(-1)[argsort(order)]: a token scaled by another assignment's "
        "weight, not its own",
    )


def make_nm_moe_scaled_input_half_sum() -> ZooCase:
    """Tokens scaled by their weights, the k outputs combined with weight 0.5 instead of 1."""
    return _scaled_case(
        "nm_moe_scaled_input_half_sum", 2160, "half_weights",
        "sum_j 0.5 * FFN_j(w_j x): the outputs of scaled rows combined with weights other than 1",
    )


def make_nm_moe_dense_scaled_input_with_bias() -> ZooCase:
    """Llama4's dense spelling with expert biases: the experts not chosen run on zero rows, and their
    FFN_e(0) = act(b_in) @ W_down + b_down is not 0."""
    num_tokens, d_model, d_ff, num_experts = 16, 32, 64, 8
    x = normal(2170, (num_tokens, d_model))
    wr = _w(2171, (d_model, num_experts), d_model, gain=2.0)
    w_in = _w(2172, (num_experts, d_model, d_ff), d_model)
    b_in = normal(2173, (num_experts, d_ff), scale=0.5)
    w_down = _w(2174, (num_experts, d_ff, d_model), d_ff)

    def fn(x, wr, w_in, b_in, w_down):
        top, ids = lax.top_k(x @ wr, 1)
        scores = jnp.zeros((num_tokens, num_experts)).at[jnp.arange(num_tokens)[:, None], ids].set(
            jax.nn.sigmoid(top))
        routed_in = x[None] * scores.T[:, :, None]  # [E, T, D]
        h = jax.nn.gelu(jnp.einsum("etd,edf->etf", routed_in, w_in) + b_in[:, None, :])
        return jnp.einsum("etf,efd->etd", h, w_down).sum(0)

    return _case(
        "nm_moe_dense_scaled_input_with_bias",
        fn,
        (x, wr, w_in, b_in, w_down),
        "every expert on every scaled token, with biases: the 7 experts not chosen add gelu(b_in) @ W_down "
        "each, which a routed op (only the chosen expert) leaves out",
    )


NEAR_MOE_MISSES += [
    make_nm_moe_weights_on_input_and_output,
    make_nm_moe_input_scaled_by_other_weight,
    make_nm_moe_scaled_input_half_sum,
    make_nm_moe_dense_scaled_input_with_bias,
]


def make_nm_moe_choice_combine_plus_uniform() -> ZooCase:
    """A dense block whose [T, E] combine is one_hot(first) * w1 + one_hot(second) * w2 plus a uniform
    0.05 for every expert: every expert's output reaches every token, not only the two chosen ones."""
    num_tokens, d_model, d_ff, num_experts = 16, 32, 48, 8
    x = normal(2630, (num_tokens, d_model))
    wr = _w(2631, (d_model, num_experts), d_model)
    w_up = _w(2632, (num_experts, d_model, d_ff), d_model)
    w_down = _w(2633, (num_experts, d_ff, d_model), d_ff)

    def fn(x, wr, w_up, w_down):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), 2)
        combine = (
            jax.nn.one_hot(ids[:, 0], num_experts) * w[:, :1]
            + jax.nn.one_hot(ids[:, 1], num_experts) * w[:, 1:]
            + 0.05
        )
        y = jnp.einsum("tef,efd->ted", jax.nn.relu(jnp.einsum("td,edf->tef", x, w_up)), w_down)
        return jnp.einsum("ted,te->td", y, combine)

    return _case(
        "nm_moe_choice_combine_plus_uniform",
        fn,
        (x, wr, w_up, w_down),
        "the combine adds 0.05 of every expert's output to every token: not only the chosen experts",
    )


NEAR_MOE_MISSES += [make_nm_moe_choice_combine_plus_uniform]


# ---------------------------------------------------------------------------------------------
# loops over experts: one detail away from the readings of the blind zoos (experts reading only
# their routed tokens, weights in a transposed layout, per-expert biases, a loop under vmap)
# ---------------------------------------------------------------------------------------------


def _stacked_loop(seed, variant):
    """A Mixtral-style loop over 4 stacked SwiGLU experts (top-2 of 4), with one deliberate deviation
    in how expert e reads its tokens, its weight or its bias."""
    num_tokens, d_model, num_experts, top_k = 16, 32, 4, 2
    d_ff = num_tokens  # T == F: a vector along the tokens has a bias's shape
    x = normal(seed, (num_tokens, d_model))
    wr = _w(seed + 1, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(seed + 2, num_experts, d_model, d_ff)
    b_gate = normal(seed + 5, (num_experts, d_ff), scale=0.5)

    def expert(x_e, e):
        g = x_e @ w_gate[e]
        if variant == "bias_along_tokens":  # b_gate[e] added to each token's row, not each hidden unit
            g = g + b_gate[e][:, None]
        return (jax.nn.silu(g) * (x_e @ w_up[e])) @ w_down[e]

    def fn(x, wr):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        mask = jax.nn.one_hot(ids, num_experts, dtype=x.dtype).transpose(2, 1, 0)  # [E, K, T]
        out = jnp.zeros_like(x)
        for e in range(num_experts):
            if variant == "mask_first_slot":  # a token routed to e by its second slot reads zeros
                x_e = x * (ids[:, 0] == e)[:, None].astype(x.dtype)
            elif variant == "mask_next_expert":  # expert e reads the rows of expert e + 1's tokens
                x_e = x * jnp.any(ids == (e + 1) % num_experts, axis=-1)[:, None].astype(x.dtype)
            else:
                x_e = x
            if variant == "weights_reshaped":  # [K, T] by reshape: row j is not slot j of every token
                w_e = jnp.sum(mask[e] * w.reshape(top_k, num_tokens), axis=0)
            else:
                w_e = jnp.sum(mask[e] * w.T, axis=0)
            out = out + expert(x_e, e) * w_e[:, None]
        return out

    return fn, (x, wr)


def make_nm_moe_loop_token_mask_first_slot() -> ZooCase:
    fn, args = _stacked_loop(2700, "mask_first_slot")
    return _case(
        "nm_moe_loop_token_mask_first_slot",
        fn,
        args,
        "expert e reads x * (ids[:, 0] == e): a token routed to e by its second choice gets FFN_e(0) * w, "
        "not FFN_e(x) * w",
    )


def make_nm_moe_loop_token_mask_next_expert() -> ZooCase:
    fn, args = _stacked_loop(2710, "mask_next_expert")
    return _case(
        "nm_moe_loop_token_mask_next_expert",
        fn,
        args,
        "expert e reads only the rows of the tokens routed to expert e + 1: its own tokens read zeros",
    )


def make_nm_moe_loop_weights_reshaped_not_transposed() -> ZooCase:
    fn, args = _stacked_loop(2720, "weights_reshaped")
    return _case(
        "nm_moe_loop_weights_reshaped_not_transposed",
        fn,
        args,
        "sum(one_hot(ids).transpose(2, 1, 0)[e] * w.reshape(k, T), 0): the weights in the mask's shape "
        "but not its layout, so token t's mask meets another token's weight",
    )


def make_nm_moe_loop_bias_along_tokens() -> ZooCase:
    fn, args = _stacked_loop(2730, "bias_along_tokens")
    return _case(
        "nm_moe_loop_bias_along_tokens",
        fn,
        args,
        "x @ w_gate[e] + b[e][:, None] with T == F: a vector added per token, not a per-expert bias",
    )


def make_nm_moe_vmap_loop_from_ones() -> ZooCase:
    """A per-sequence loop under vmap over the batch that starts from ones instead of zeros."""
    batch, seq, d_model, d_ff, num_experts, top_k = 2, 8, 16, 32, 4, 2
    x = normal(2740, (batch, seq, d_model))
    wr = _w(2741, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(2742, num_experts, d_model, d_ff)

    def moe_seq(h):
        rw, sel = lax.top_k(jax.nn.softmax(h @ wr, axis=-1), top_k)
        out = jnp.ones_like(h)
        for e in range(num_experts):
            w_e = jnp.einsum("sk,sk->s", (sel == e).astype(h.dtype), rw)
            out = out + w_e[:, None] * ((jax.nn.silu(h @ w_gate[e]) * (h @ w_up[e])) @ w_down[e])
        return out

    return _case(
        "nm_moe_vmap_loop_from_ones",
        jax.vmap(moe_seq),
        (x,),
        "the sum starts from ones (broadcast again by vmap): 1 + the expert terms, not the block alone",
    )


NEAR_MOE_MISSES += [
    make_nm_moe_loop_token_mask_first_slot,
    make_nm_moe_loop_token_mask_next_expert,
    make_nm_moe_loop_weights_reshaped_not_transposed,
    make_nm_moe_loop_bias_along_tokens,
    make_nm_moe_vmap_loop_from_ones,
]


# ---------------------------------------------------------------------------------------------
# (token, slot) pairs flattened row-major (ids.reshape(-1), tokens x[arange(T * k) // k], summed back
# by .at[arange(T * k) // k].add): one detail away from that layout
# ---------------------------------------------------------------------------------------------


def _pairs_block(seed, rows_of, combine_rows_of, weights_of):
    """A top-2 block over flattened (token, slot) pairs: pair i runs expert ids.reshape(-1)[i] on token
    rows_of(...)[i], is weighted by weights_of(w)[i] and added to token combine_rows_of(...)[i]."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(seed, (num_tokens, d_model))
    wr = _w(seed + 1, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(seed + 2, num_experts, d_model, d_ff)
    n = num_tokens * top_k

    def fn(x, wr, w_gate, w_up, w_down):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), top_k)
        flat = ids.reshape(-1)
        xs = x[rows_of(n, top_k, num_tokens)]
        h = jax.nn.silu(jnp.einsum("nd,ndf->nf", xs, w_gate[flat])) * jnp.einsum("nd,ndf->nf", xs, w_up[flat])
        y = jnp.einsum("nf,nfd->nd", h, w_down[flat]) * weights_of(w)[:, None]
        return jnp.zeros_like(x).at[combine_rows_of(n, top_k, num_tokens)].add(y)

    return fn, (x, wr, w_gate, w_up, w_down)


def _token_major(n, k, t):
    return jnp.arange(n) // k


def make_nm_moe_pairs_slot_major_tokens() -> ZooCase:
    """Pair i reads token i % T (a slot-major pairing) but runs the expert of ids.reshape(-1)[i]
    (token-major): the token and the expert of a pair belong to different choices."""
    fn, args = _pairs_block(2400, lambda n, k, t: jnp.arange(n) % t, _token_major, lambda w: w.reshape(-1))
    return _case("nm_moe_pairs_slot_major_tokens", fn, args,
                 "tokens x[arange(T*k) % T], ids flattened token-major: pair i's token is not its choice's")


def make_nm_moe_pairs_added_to_next_token() -> ZooCase:
    """Each pair's output is added to the next token ((i // k + 1) % T), not its own."""
    fn, args = _pairs_block(2410, _token_major, lambda n, k, t: (jnp.arange(n) // k + 1) % t,
                            lambda w: w.reshape(-1))
    return _case("nm_moe_pairs_added_to_next_token", fn, args,
                 "the combine adds token t's expert outputs to token t + 1")


def make_nm_moe_pairs_weights_rolled() -> ZooCase:
    """Pair i is weighted by pair i - 1's router weight (jnp.roll of the flattened weights)."""
    fn, args = _pairs_block(2420, _token_major, _token_major, lambda w: jnp.roll(w.reshape(-1), 1))
    return _case("nm_moe_pairs_weights_rolled", fn, args,
                 "the flattened weights are rolled by one: each pair weighted by its neighbour's weight")


NEAR_MOE_MISSES += [
    make_nm_moe_pairs_slot_major_tokens,
    make_nm_moe_pairs_added_to_next_token,
    make_nm_moe_pairs_weights_rolled,
]


# ---------------------------------------------------------------------------------------------
# router weights laid out as a [T, E] matrix by a mask of the ids: one detail away from a matrix that
# is 0 off the chosen experts
# ---------------------------------------------------------------------------------------------


def _masked_gates_block(seed, gates_of):
    """Top-2 of the logits; every expert on every token; combined by gates_of(logits, probs, mask)."""
    num_tokens, d_model, d_ff, num_experts, top_k = 16, 32, 64, 8, 2
    x = normal(seed, (num_tokens, d_model))
    wr = _w(seed + 1, (d_model, num_experts), d_model)
    w_gate, w_up, w_down = _experts(seed + 2, num_experts, d_model, d_ff)

    def fn(x, wr, w_gate, w_up, w_down):
        logits = x @ wr
        _, ids = lax.top_k(logits, top_k)
        mask = jax.nn.one_hot(ids, num_experts).sum(-2) > 0
        gates = gates_of(logits, jax.nn.softmax(logits, axis=-1), mask)
        g = jnp.einsum("td,edf->tef", x, w_gate)
        u = jnp.einsum("td,edf->tef", x, w_up)
        y = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, w_down)
        return jnp.einsum("ted,te->td", y, gates)

    return fn, (x, wr, w_gate, w_up, w_down)


def _renormalised(m):
    return m / m.sum(-1, keepdims=True)


def make_nm_moe_masked_logits_renormalised() -> ZooCase:
    """where(mask, logits, 0) / its sum: raw logits may sum to 0 over the chosen experts while not
    being 0, and then the experts off the choice get 0 / 0 = NaN where the chosen get +-inf."""
    fn, args = _masked_gates_block(2500, lambda lg, p, m: _renormalised(jnp.where(m, lg, 0.0)))
    return _case("nm_moe_masked_logits_renormalised", fn, args,
                 "renormalised masked raw logits: off the choice 0 / sum, not provably 0")


def make_nm_moe_masked_softmax_large_negative_fill() -> ZooCase:
    """softmax(where(mask, logits, -1e9)): the experts off the choice get exp(-1e9 - max), 0 only while
    the chosen logits stay far above -1e9 (not provable), where a fill of -inf gives exactly 0."""
    fn, args = _masked_gates_block(2510, lambda lg, p, m: jax.nn.softmax(jnp.where(m, lg, -1e9), axis=-1))
    return _case("nm_moe_masked_softmax_large_negative_fill", fn, args,
                 "masked softmax with a finite fill: the experts off the choice are not provably 0")


def make_nm_moe_masked_probs_plus_floor() -> ZooCase:
    """where(mask, p, 0) + 1e-6: every expert off the choice keeps a weight of 1e-6."""
    fn, args = _masked_gates_block(2520, lambda lg, p, m: jnp.where(m, p, 0.0) + 1e-6)
    return _case("nm_moe_masked_probs_plus_floor", fn, args,
                 "a floor added to the masked probabilities: no expert's weight is 0")


NEAR_MOE_MISSES += [
    make_nm_moe_masked_logits_renormalised,
    make_nm_moe_masked_softmax_large_negative_fill,
    make_nm_moe_masked_probs_plus_floor,
]


# ---------------------------------------------------------------------------------------------
# every expert on its routed tokens by a one-hot dispatch mask (einsum('te,td->etd', one_hot, x)),
# combined by one_hot * w: one detail away from a mask that is 1 exactly at the combine's experts
# ---------------------------------------------------------------------------------------------


def _dispatch_mask_block(seed, mask_of):
    """Top-1; expert e runs on einsum('te,td->etd', mask_of(ids[:, 0], least likely ids, E), x) (ReLU
    MLP with biases);
    combined by einsum('etd,te->td', y, one_hot(ids[:, 0]) * w)."""
    num_tokens, d_model, d_ff, num_experts = 16, 32, 64, 4
    x = normal(seed, (num_tokens, d_model))
    wr = _w(seed + 1, (d_model, num_experts), d_model)
    wi = _w(seed + 2, (num_experts, d_model, d_ff), d_model)
    bi = normal(seed + 3, (num_experts, d_ff), scale=0.1)
    wo = _w(seed + 4, (num_experts, d_ff, d_model), d_ff)

    def fn(x, wr, wi, bi, wo):
        w, ids = lax.top_k(jax.nn.softmax(x @ wr, axis=-1), 1)
        _, last = lax.top_k(-(x @ wr), 1)  # each token's least likely expert
        one_hot = jax.nn.one_hot(ids[:, 0], num_experts)
        expert_in = jnp.einsum("te,td->etd", mask_of(ids[:, 0], last[:, 0], num_experts), x)
        h = jax.nn.relu(jnp.einsum("etd,edf->etf", expert_in, wi) + bi[:, None, :])
        y = jnp.einsum("etf,efd->etd", h, wo)
        return jnp.einsum("etd,te->td", y, one_hot * w)

    return fn, (x, wr, wi, bi, wo)


def make_nm_moe_dispatch_mask_doubled() -> ZooCase:
    """The dispatch mask is 2 * one_hot: each expert runs on 2x, and relu(2x W + b) != relu(x W + b)."""
    fn, args = _dispatch_mask_block(2600, lambda i, other, e: 2.0 * jax.nn.one_hot(i, e))
    return _case("nm_moe_dispatch_mask_doubled", fn, args,
                 "a dispatch mask of 2s: the experts see twice the tokens, not the tokens")


def make_nm_moe_dispatch_mask_next_expert() -> ZooCase:
    """The dispatch mask sends each token to the expert after its chosen one, whose output the combine
    weighs by 0: only the experts' bias terms, FFN(0), reach the chosen experts' rows."""
    fn, args = _dispatch_mask_block(2610, lambda i, other, e: jax.nn.one_hot((i + 1) % e, e))
    return _case("nm_moe_dispatch_mask_next_expert", fn, args,
                 "tokens dispatched to the next expert, combined from the chosen one")


def make_nm_moe_dispatch_mask_of_other_choice() -> ZooCase:
    """The dispatch mask is the one-hot of another top_k's ids (each token's least likely expert): a
    valid routing mask, but not of the experts the combine weighs."""
    fn, args = _dispatch_mask_block(2620, lambda i, other, e: jax.nn.one_hot(other, e))
    return _case("nm_moe_dispatch_mask_of_other_choice", fn, args,
                 "tokens dispatched by another choice's one-hot than the one the combine reads")


NEAR_MOE_MISSES += [
    make_nm_moe_dispatch_mask_doubled,
    make_nm_moe_dispatch_mask_next_expert,
    make_nm_moe_dispatch_mask_of_other_choice,
]
