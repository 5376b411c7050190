"""A fifth, blind batch of whole MoE blocks (router + routed experts + combine, some with a shared expert).

Written from a description of what each block computes, without reading the matcher, the way an
engineer porting a model to JAX writes it. Styles not in blind3 / blind4:

* routing masks built as ``jax.nn.one_hot(ids, E).sum(-2)`` and gates by ``jnp.where`` on the full
  [.., E] probabilities, softmax written out as ``exp(l - max) / sum``, unflattened ``[B, S, D]``;
* the softmax over the k chosen logits spelled as a masked softmax over all E (``-inf`` outside the mask);
* combines over flattened (token, slot) pairs: ``jax.ops.segment_sum`` and ``zeros().at[rows].add``;
* Haiku ``hk.Linear``-like ``x @ w + b`` experts (expert biases), Equinox modules with ``[out, in]``
  weights and biases, stacked by ``jax.tree.map(jnp.stack)`` and ``jax.vmap``-ed over experts and tokens;
* transforms around the block: ``jax.checkpoint``, ``lax.scan`` over token chunks, ``jax.vmap`` over the
  batch, ``jnp.argsort(descending=True)`` for top-k, every expert run and the chosen outputs picked by
  ``take_along_axis``;
* DeepSeek-style sigmoid + correction bias with group-limited top-k whose group score is the group's
  max (``reshape(T, G, E // G).max(-1)``); Qwen2-MoE's bf16 experts with an f32 router and a shared
  expert gated by ``sigmoid(x @ w_shared_gate)``.

Each ``make_<name>()`` returns a :class:`tests.zoo.moe_blocks_blind3.Blind3Case` whose ``expect`` holds the
block's true parameters (the keys of blind4, see ``moe_blocks_blind4.py``) and whose ``ref`` (a
:class:`tests.zoo.moe_blocks_blind4.Block4Ref`) describes the same block in canonical layout, for the
independent per-token reference in ``test_moe_blind5_selfcheck.py``.

Example::

    case = make_haiku_linear_bias_segment_sum()
    y = jax.jit(case.fn)(*case.args)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from . import normal
from .moe_blocks_blind3 import Blind3Case, FfnRef, RouterRef, _init, _np, _swiglu_ref, _t
from .moe_blocks_blind4 import Block4Ref, Router4Ref, _case, _expect, _pytree, _stack_np

F32 = jnp.float32
BF16 = jnp.bfloat16


@dataclass(frozen=True)
class Router5Ref(RouterRef):
    """:class:`RouterRef` whose group-limited choice may score a group by its best member.

    ``group_score`` "top2_sum" (blind3: sum of the group's two best biased scores) or "max" (the group's
    best biased score, DeepSeek-V2's group-limited greedy).
    """

    group_score: str = "top2_sum"


# ---------------------------------------------------------------------------------------------
# 1. [B, S, D] unflattened; softmax written as exp(l - max) / sum; ids from top_k of the logits;
#    mask one_hot(ids).sum(-2); gates where(mask, probs, 0) renormalised; dense erf GeGLU einsums
# ---------------------------------------------------------------------------------------------


def make_onehot_mask_where_gates_bsd_geglu() -> Blind3Case:
    """Softmax top-2 renorm as where(one_hot(ids).sum(-2) > 0, p, 0) / sum; dense erf GeGLU on [B, S, D]."""
    B, S, D, F, E, K = 2, 8, 32, 32, 8, 2
    x = normal(8001, (B, S, D))
    p = {
        "router": _init(8002, (D, E), D),
        "wi_0": _init(8003, (E, D, F), D),
        "wi_1": _init(8004, (E, D, F), D),
        "wo": _init(8005, (E, F, D), F),
    }

    def moe(p, x):
        logits = jnp.einsum("bsd,de->bse", x, p["router"])
        z = jnp.exp(logits - logits.max(-1, keepdims=True))
        probs = z / z.sum(-1, keepdims=True)
        _, ids = lax.top_k(logits, K)
        mask = jax.nn.one_hot(ids, E, dtype=x.dtype).sum(-2)  # [B, S, E]
        gates = jnp.where(mask > 0, probs, 0.0)
        gates = gates / gates.sum(-1, keepdims=True)
        g = jnp.einsum("bsd,edf->ebsf", x, p["wi_0"])
        u = jnp.einsum("bsd,edf->ebsf", x, p["wi_1"])
        y = jnp.einsum("ebsf,efd->ebsd", jax.nn.gelu(g, approximate=False) * u, p["wo"])
        return jnp.einsum("ebsd,bse->bsd", y, gates)

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["router"]), K, renorm=True),
        FfnRef("geglu", gate=_np(p["wi_0"]), up=_np(p["wi_1"]), down=_np(p["wo"]), gelu_approximate=False),
    )
    return _case(
        "onehot_mask_where_gates_bsd_geglu",
        moe,
        (p, x),
        _expect(K, E, "geglu"),
        ref,
        "[B, S, D]: exp(l - max)/sum softmax, top_k of the logits, gates where(one_hot(ids).sum(-2) > 0, p, "
        "0) renormalised; dense erf GeGLU, einsum ebsd,bse->bsd",
    )


# ---------------------------------------------------------------------------------------------
# 2. Haiku: hk.Linear-like {"w", "b"} params per stacked expert; flattened (token, slot) pairs with
#    gathered weights; combine jax.ops.segment_sum over the token of each pair
# ---------------------------------------------------------------------------------------------


def make_haiku_linear_bias_segment_sum() -> Blind3Case:
    """Softmax top-2 (no renorm); pairs x[rows] through W[ids] + b[ids] tanh-GELU MLP; segment_sum combine."""
    T, D, F, E, K = 16, 32, 48, 8, 2
    x = normal(8101, (T, D))
    params = {
        "moe/~/router": {"w": _init(8102, (D, E), D)},
        "moe/~/experts/~/fc1": {"w": _init(8103, (E, D, F), D), "b": normal(8104, (E, F), scale=0.1)},
        "moe/~/experts/~/fc2": {"w": _init(8105, (E, F, D), F), "b": normal(8106, (E, D), scale=0.1)},
    }

    def moe(params, x):
        n = x.shape[0]
        probs = jax.nn.softmax(x @ params["moe/~/router"]["w"], axis=-1)
        w, ids = lax.top_k(probs, K)
        flat = ids.reshape(-1)
        rows = jnp.repeat(jnp.arange(n), K)
        fc1, fc2 = params["moe/~/experts/~/fc1"], params["moe/~/experts/~/fc2"]
        h = jax.nn.gelu(jnp.einsum("nd,ndf->nf", x[rows], fc1["w"][flat]) + fc1["b"][flat])
        y = jnp.einsum("nf,nfd->nd", h, fc2["w"][flat]) + fc2["b"][flat]
        return jax.ops.segment_sum(y * w.reshape(-1, 1), rows, num_segments=n)

    fc1, fc2 = params["moe/~/experts/~/fc1"], params["moe/~/experts/~/fc2"]
    ref = Block4Ref(
        _np(x),
        RouterRef(_np(params["moe/~/router"]["w"]), K),
        FfnRef("gelu", up=_np(fc1["w"]), down=_np(fc2["w"]), up_b=_np(fc1["b"]), down_b=_np(fc2["b"])),
    )
    return _case(
        "haiku_linear_bias_segment_sum",
        moe,
        (params, x),
        _expect(K, E, "gelu"),
        ref,
        "Haiku: {'w', 'b'} expert params, flattened (token, slot) pairs x[repeat(arange, k)] through "
        "W[ids] + b[ids] tanh-GELU MLP, * w, jax.ops.segment_sum back to tokens",
    )


# ---------------------------------------------------------------------------------------------
# 3. jax.checkpoint around the block; top-2 by argsort(descending=True); softmax over the two chosen
#    logits; every expert run on every token by vmap over the expert axis, the chosen outputs picked
#    with take_along_axis; combine einsum('tk,tkd->td')
# ---------------------------------------------------------------------------------------------


def make_remat_argsort_desc_pick_outputs() -> Blind3Case:
    """Top-2 logits by argsort(descending), softmax over the 2; vmap experts, take_along_axis; remat."""
    T, D, F, E, K = 24, 32, 32, 8, 2
    x = normal(8201, (T, D))
    p = {
        "router": _init(8202, (D, E), D),
        "wg": _init(8203, (E, D, F), D),
        "wu": _init(8204, (E, D, F), D),
        "wd": _init(8205, (E, F, D), F),
    }

    def expert(wg, wu, wd, x):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    @jax.checkpoint
    def moe(p, x):
        logits = x @ p["router"]
        ids = jnp.argsort(logits, axis=-1, descending=True)[:, :K]
        w = jax.nn.softmax(jnp.take_along_axis(logits, ids, axis=-1), axis=-1)
        y_all = jax.vmap(expert, in_axes=(0, 0, 0, None))(p["wg"], p["wu"], p["wd"], x)  # [E, T, D]
        y = jnp.take_along_axis(y_all.transpose(1, 0, 2), ids[..., None], axis=1)  # [T, K, D]
        return jnp.einsum("tk,tkd->td", w, y)

    ref = Block4Ref(
        _np(x),
        Router4Ref(_np(p["router"]), K, order="topk_then_score"),
        _swiglu_ref(p["wg"], p["wu"], p["wd"]),
    )
    return _case(
        "remat_argsort_desc_pick_outputs",
        moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "jax.checkpoint block: argsort(logits, descending=True)[:, :2], softmax over the 2 logits; vmap over "
        "E of every expert on every token, take_along_axis picks the chosen outputs; einsum tk,tkd->td",
    )


# ---------------------------------------------------------------------------------------------
# 4. a per-sequence block [S, D] under jax.vmap over the batch; sigmoid top-2 renorm; experts
#    gathered per token; combine einsum('tk,tkd->td')
# ---------------------------------------------------------------------------------------------


def make_vmap_batch_sigmoid_gather_tk_tkd() -> Blind3Case:
    """Sigmoid top-2 renorm per sequence under vmap over B; W[ids] SwiGLU per token; einsum tk,tkd->td."""
    B, S, D, F, E, K = 2, 16, 32, 32, 8, 2
    x = normal(8301, (B, S, D))
    p = {
        "router": _init(8302, (D, E), D),
        "wg": _init(8303, (E, D, F), D),
        "wu": _init(8304, (E, D, F), D),
        "wd": _init(8305, (E, F, D), F),
    }

    def moe_seq(p, x):  # x [S, D]
        s = jax.nn.sigmoid(x @ p["router"])
        w, ids = lax.top_k(s, K)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        g = jnp.einsum("sd,skdf->skf", x, p["wg"][ids])
        u = jnp.einsum("sd,skdf->skf", x, p["wu"][ids])
        y = jnp.einsum("skf,skfd->skd", jax.nn.silu(g) * u, p["wd"][ids])
        return jnp.einsum("sk,skd->sd", w, y)

    def moe(p, x):
        return jax.vmap(moe_seq, in_axes=(None, 0))(p, x)

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["router"]), K, "sigmoid", renorm=True),
        _swiglu_ref(p["wg"], p["wu"], p["wd"]),
    )
    return _case(
        "vmap_batch_sigmoid_gather_tk_tkd",
        moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "per-sequence block under jax.vmap(in_axes=(None, 0)) over B: sigmoid top-2 renorm, W[ids] gathered "
        "SwiGLU per token, einsum sk,skd->sd",
    )


# ---------------------------------------------------------------------------------------------
# 5. DeepSeek-style gate: sigmoid + correction bias (choice only), group-limited with the group's max
#    as its score (reshape(T, G, E // G).max(-1), top_k of the maxima, one_hot mask, -inf fill),
#    top-4, renorm, x2.0; dense experts combined through zeros.at[rows, ids].add(w); shared expert
# ---------------------------------------------------------------------------------------------


def make_deepseek_sigmoid_bias_group_max_dense() -> Blind3Case:
    """Sigmoid + bias, 4 groups keep 2 by group max, -inf fill, top-4 renorm x2.0; dense; .at[].add gates."""
    T, D, F, Fs, E, K, G, TG = 16, 32, 32, 64, 16, 4, 4, 2
    x = normal(8401, (T, D))
    p = {
        "gate": _init(8402, (D, E), D),
        "e_score_correction_bias": normal(8403, (E,), scale=0.1),
        "w_gate": _init(8404, (E, D, F), D),
        "w_up": _init(8405, (E, D, F), D),
        "w_down": _init(8406, (E, F, D), F),
        "shared_gate": _init(8407, (D, Fs), D),
        "shared_up": _init(8408, (D, Fs), D),
        "shared_down": _init(8409, (Fs, D), Fs),
    }

    def moe(p, x):
        t = x.shape[0]
        scores = jax.nn.sigmoid(x @ p["gate"])
        biased = scores + p["e_score_correction_bias"]
        grouped = biased.reshape(t, G, E // G)
        _, top_groups = lax.top_k(grouped.max(axis=-1), TG)
        group_mask = jax.nn.one_hot(top_groups, G).sum(-2) > 0  # [T, G]
        masked = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(t, E)
        _, ids = lax.top_k(masked, K)
        w = jnp.take_along_axis(scores, ids, axis=-1)
        w = 2.0 * w / jnp.sum(w, axis=-1, keepdims=True)
        gates = jnp.zeros((t, E), x.dtype).at[jnp.arange(t)[:, None], ids].add(w)
        h = jax.nn.silu(jnp.matmul(x[None], p["w_gate"])) * jnp.matmul(x[None], p["w_up"])  # [E, T, F]
        routed = jnp.einsum("etd,te->td", jnp.matmul(h, p["w_down"]), gates)
        shared = (jax.nn.silu(x @ p["shared_gate"]) * (x @ p["shared_up"])) @ p["shared_down"]
        return routed + shared

    ref = Block4Ref(
        _np(x),
        Router5Ref(
            _np(p["gate"]),
            K,
            "sigmoid",
            renorm=True,
            scale=2.0,
            selection_bias=_np(p["e_score_correction_bias"]),
            n_group=G,
            topk_group=TG,
            group_score="max",
        ),
        _swiglu_ref(p["w_gate"], p["w_up"], p["w_down"]),
        shared=_swiglu_ref(p["shared_gate"], p["shared_up"], p["shared_down"]),
    )
    return _case(
        "deepseek_sigmoid_bias_group_max_dense",
        moe,
        (p, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "DeepSeek-style: sigmoid + correction bias, group score = reshape(T, G, E//G).max(-1), one_hot(top "
        "groups).sum mask, -inf fill, top-4, 2.0 * renorm; x[None] @ W dense, zeros.at[rows, ids].add(w); "
        "shared",
    )


# ---------------------------------------------------------------------------------------------
# 6. Qwen2-MoE port, bf16 params, f32 router; top-4 without renorm; flattened (token, slot) pairs
#    with gathered bf16 experts, combined by zeros(f32).at[rows].add; shared expert times
#    sigmoid(x @ w_shared_gate)
# ---------------------------------------------------------------------------------------------


def make_qwen2_bf16_pairs_at_add_shared_gate() -> Blind3Case:
    """bf16: f32 softmax top-4 (no renorm); pairs through W[ids] SwiGLU, .at[rows].add; gated shared."""
    T, D, F, Fs, E, K = 16, 32, 32, 64, 8, 4
    x = normal(8501, (T, D), BF16)
    p = {
        "gate": _init(8502, (D, E), D),  # f32
        "gate_proj": _init(8503, (E, D, F), D, BF16),
        "up_proj": _init(8504, (E, D, F), D, BF16),
        "down_proj": _init(8505, (E, F, D), F, BF16),
        "shared_expert": {
            "gate_proj": _init(8506, (D, Fs), D, BF16),
            "up_proj": _init(8507, (D, Fs), D, BF16),
            "down_proj": _init(8508, (Fs, D), Fs, BF16),
        },
        "shared_expert_gate": _init(8509, (D, 1), D, BF16),
    }

    def qwen2_moe(p, hidden):
        n = hidden.shape[0]
        probs = jax.nn.softmax(hidden.astype(F32) @ p["gate"], axis=-1)
        topw, sel = lax.top_k(probs, K)
        flat = sel.reshape(-1)
        rows = jnp.arange(n * K) // K
        xs = hidden[rows]
        act = jax.nn.silu(jnp.einsum("nd,ndf->nf", xs, p["gate_proj"][flat]))
        act = act * jnp.einsum("nd,ndf->nf", xs, p["up_proj"][flat])
        y = jnp.einsum("nf,nfd->nd", act, p["down_proj"][flat]).astype(F32)
        routed = jnp.zeros((n, hidden.shape[1]), F32).at[rows].add(y * topw.reshape(-1)[:, None])
        se = p["shared_expert"]
        shared = (jax.nn.silu(hidden @ se["gate_proj"]) * (hidden @ se["up_proj"])) @ se["down_proj"]
        shared = jax.nn.sigmoid(hidden @ p["shared_expert_gate"]) * shared
        return (routed + shared.astype(F32)).astype(hidden.dtype)

    se = p["shared_expert"]
    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["gate"]), K),
        _swiglu_ref(p["gate_proj"], p["up_proj"], p["down_proj"]),
        shared=_swiglu_ref(se["gate_proj"], se["up_proj"], se["down_proj"]),
        shared_gate=_np(p["shared_expert_gate"])[:, 0],
    )
    return _case(
        "qwen2_bf16_pairs_at_add_shared_gate",
        qwen2_moe,
        (p, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "Qwen2-MoE bf16: f32 softmax top-4 no renorm, (token, slot) pairs hidden[arange(T*k)//k] through "
        "W[ids] SwiGLU, zeros(f32).at[rows].add(y * w); shared * sigmoid(x @ w_shared_gate)",
    )


# ---------------------------------------------------------------------------------------------
# 7. lax.scan over chunks of 8 tokens (memory-bounded routing); Switch-style top-1, one-hot dispatch
#    einsum('ce,cd->ecd'), ReLU MLP experts with biases, combine einsum('ecd,ce->cd')
# ---------------------------------------------------------------------------------------------


def make_scan_token_chunks_top1_relu_bias() -> Blind3Case:
    """Softmax top-1 (weight = prob) in a lax.scan over 4 chunks of 8 tokens; one-hot dispatch; ReLU+bias."""
    T, C, D, F, E, K = 32, 8, 16, 32, 4, 1
    x = normal(8601, (T, D))
    p = {
        "router": _init(8602, (D, E), D),
        "wi": _init(8603, (E, D, F), D),
        "bi": normal(8604, (E, F), scale=0.1),
        "wo": _init(8605, (E, F, D), F),
        "bo": normal(8606, (E, D), scale=0.1),
    }

    def chunk(p, xc):  # xc [C, D]
        probs = jax.nn.softmax(xc @ p["router"], axis=-1)
        w, ids = lax.top_k(probs, 1)
        dispatch = jax.nn.one_hot(ids[:, 0], E, dtype=xc.dtype)  # [C, E]
        expert_in = jnp.einsum("ce,cd->ecd", dispatch, xc)
        h = jax.nn.relu(jnp.einsum("ecd,edf->ecf", expert_in, p["wi"]) + p["bi"][:, None, :])
        y = jnp.einsum("ecf,efd->ecd", h, p["wo"]) + p["bo"][:, None, :]
        return jnp.einsum("ecd,ce->cd", y, dispatch * w)

    def moe(p, x):
        _, ys = lax.scan(lambda carry, xc: (carry, chunk(p, xc)), None, x.reshape(-1, C, x.shape[-1]))
        return ys.reshape(x.shape)

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["router"]), K),
        FfnRef("relu", up=_np(p["wi"]), down=_np(p["wo"]), up_b=_np(p["bi"]), down_b=_np(p["bo"])),
    )
    return _case(
        "scan_token_chunks_top1_relu_bias",
        moe,
        (p, x),
        _expect(K, E, "relu"),
        ref,
        "lax.scan over 4 chunks of 8 tokens: softmax top-1 (weight = prob), one_hot dispatch "
        "einsum ce,cd->ecd, ReLU MLP with biases, einsum ecd,ce->cd with dispatch * w",
    )


# ---------------------------------------------------------------------------------------------
# 8. Equinox: per-expert modules of eqx.nn.Linear ([out, in] weight + bias, applied to one token)
#    stacked with jax.tree.map(jnp.stack); vmap over experts of vmap over tokens on the masked input
#    where(routed, x, 0); tanh GeGLU with biases; softmax top-3 renorm
# ---------------------------------------------------------------------------------------------


@_pytree
@dataclass(frozen=True)
class _EqxLinearBias:
    weight: jax.Array  # [out, in]
    bias: jax.Array  # [out]

    def __call__(self, x):  # one token x [in]
        return self.weight @ x + self.bias


@_pytree
@dataclass(frozen=True)
class _EqxGeGLU:
    gate: _EqxLinearBias
    up: _EqxLinearBias
    down: _EqxLinearBias

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


def make_eqx_stacked_modules_masked_input_geglu() -> Blind3Case:
    """Softmax top-3 renorm; stacked eqx GeGLU modules (biases), vmap(E) of vmap(T) on where(routed, x, 0)."""
    T, D, F, E, K = 16, 24, 32, 6, 3
    x = normal(8701, (T, D))
    router = _init(8702, (E, D), D)  # eqx.nn.Linear(D, E, use_bias=False).weight

    def lin(seed, out, inp):
        return _EqxLinearBias(_init(seed, (out, inp), inp), normal(seed + 1, (out,), scale=0.1))

    modules = [
        _EqxGeGLU(lin(8710 + 6 * e, F, D), lin(8712 + 6 * e, F, D), lin(8714 + 6 * e, D, F)) for e in range(E)
    ]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *modules)

    def forward(router, experts, x):
        probs = jax.nn.softmax(jax.vmap(lambda t: router @ t)(x), axis=-1)
        w, ids = lax.top_k(probs, K)
        w = w / w.sum(-1, keepdims=True)
        onehot = jax.nn.one_hot(ids, E, dtype=x.dtype)  # [T, K, E]
        routed = onehot.sum(1).T > 0  # [E, T]
        x_e = jnp.where(routed[:, :, None], x[None], 0.0)
        y = jax.vmap(lambda m, xs: jax.vmap(m)(xs))(experts, x_e)  # [E, T, D]
        combine = jnp.einsum("tke,tk->et", onehot, w)
        return jnp.sum(y * combine[:, :, None], axis=0)

    def mods(field_name):
        return [getattr(m, field_name) for m in modules]

    ref = Block4Ref(
        _np(x),
        RouterRef(_t(router, 1, 0), K, renorm=True),
        FfnRef(
            "geglu",
            gate=_stack_np([m.weight for m in mods("gate")], 1, 0),
            up=_stack_np([m.weight for m in mods("up")], 1, 0),
            down=_stack_np([m.weight for m in mods("down")], 1, 0),
            gate_b=_stack_np([m.bias for m in mods("gate")]),
            up_b=_stack_np([m.bias for m in mods("up")]),
            down_b=_stack_np([m.bias for m in mods("down")]),
        ),
    )
    return _case(
        "eqx_stacked_modules_masked_input_geglu",
        forward,
        (router, stacked, x),
        _expect(K, E, "geglu"),
        ref,
        "Equinox: per-token eqx.nn.Linear (W @ x + b) GeGLU modules stacked by jax.tree.map(jnp.stack), "
        "vmap(E) of vmap(T) on where(routed, x, 0); combine einsum tke,tk->et; E = 6, top-3 renorm",
    )


# ---------------------------------------------------------------------------------------------
# 9. the softmax over the k chosen logits written as a masked softmax over all E (-inf outside the
#    top-3 mask); dense SiLU MLP experts; combine einsum('te,etd->td')
# ---------------------------------------------------------------------------------------------


def make_masked_softmax_over_chosen_dense_silu() -> Blind3Case:
    """Top-3 logits, softmax(where(one_hot(ids).sum(-2) > 0, logits, -inf)) over E; dense SiLU MLP."""
    T, D, F, E, K = 20, 24, 48, 8, 3
    x = normal(8801, (T, D))
    p = {"router": _init(8802, (D, E), D), "w1": _init(8803, (E, D, F), D), "w2": _init(8804, (E, F, D), F)}

    def moe(p, x):
        logits = jnp.dot(x, p["router"])
        _, ids = lax.top_k(logits, K)
        chosen = jax.nn.one_hot(ids, E).sum(-2) > 0
        gates = jax.nn.softmax(jnp.where(chosen, logits, -jnp.inf), axis=-1)  # [T, E], 0 off the top-3
        h = jax.nn.silu(jnp.einsum("td,edf->etf", x, p["w1"]))
        y = jnp.einsum("etf,efd->etd", h, p["w2"])
        return jnp.einsum("te,etd->td", gates, y)

    ref = Block4Ref(
        _np(x),
        Router4Ref(_np(p["router"]), K, order="topk_then_score"),
        FfnRef("silu", up=_np(p["w1"]), down=_np(p["w2"])),
    )
    return _case(
        "masked_softmax_over_chosen_dense_silu",
        moe,
        (p, x),
        _expect(K, E, "silu"),
        ref,
        "softmax over the top-3 logits as softmax(where(one_hot(ids).sum(-2) > 0, logits, -inf)) over all "
        "E; dense SiLU MLP; einsum te,etd->td",
    )


BLIND5_MOE_BLOCKS = [
    make_onehot_mask_where_gates_bsd_geglu,
    make_haiku_linear_bias_segment_sum,
    make_remat_argsort_desc_pick_outputs,
    make_vmap_batch_sigmoid_gather_tk_tkd,
    make_deepseek_sigmoid_bias_group_max_dense,
    make_qwen2_bf16_pairs_at_add_shared_gate,
    make_scan_token_chunks_top1_relu_bias,
    make_eqx_stacked_modules_masked_input_geglu,
    make_masked_softmax_over_chosen_dense_silu,
]
