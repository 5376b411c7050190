"""A third, blind batch of whole MoE blocks (router + routed experts, some with a shared expert).

Written from a description of what each block computes, without reading the matcher, in spellings
of libraries other than MaxText / EasyDeL / tpu-inference / SGLang-JAX: Equinox, Haiku and Flax
ports of PyTorch HF code (Mixtral, Qwen2-MoE, OLMoE, DBRX, DeepSeek-V2/V3, Jamba, Arctic, Grok,
JetMoE), Praxis / GShard, t5x / flaxformer Switch, levanter, keras-jax and hand-written research
code, with the respellings a user writes without thinking of a compiler pass (sigmoid as
``1 / (1 + exp(-x))``, softmax through ``logsumexp``, top-k by ``argsort``, ``x[None] @ W`` ...).

Each ``make_<name>()`` returns a :class:`Blind3Case`: a :class:`tests.zoo.ZooCase` whose ``expect``
holds the block's true parameters and whose ``ref`` (a :class:`BlockRef`) describes the same block
in canonical layout, for the independent per-token reference in ``test_moe_blind3_selfcheck.py``.

Example::

    case = make_olmoe_argsort_topk_dense()
    y = jax.jit(case.fn)(*case.args)

``expect`` keys: ``k``, ``num_experts``, ``activation`` ("swiglu" | "geglu" | "gelu" | "relu" |
"silu"), ``shared_expert`` (bool), ``capacity`` (slots per expert, or None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import ZooCase, normal

MOE = "MOE"
F32 = jnp.float32
BF16 = jnp.bfloat16


@dataclass(frozen=True)
class RouterRef:
    """The router in canonical form: logits = x @ w [D, E], then score / top-k / post steps.

    order "score_then_topk": score all E (softmax | sigmoid), add ``selection_bias`` for the choice
    only, optional group-limited choice (``n_group`` consecutive groups, group score = sum of the
    two best, keep ``topk_group``, others filled with ``group_fill``), pick k (ties: lower id first),
    weights = unbiased scores at the ids, then renorm (``w / (sum + renorm_eps)``) and ``* scale``.
    order "topk_then_score": top-k of the logits, softmax over the k values.
    """

    w: np.ndarray
    k: int
    score: str = "softmax"
    order: str = "score_then_topk"
    renorm: bool = False
    renorm_eps: float = 0.0
    scale: float | None = None
    selection_bias: np.ndarray | None = None
    n_group: int = 1
    topk_group: int = 1
    group_fill: float = -math.inf


@dataclass(frozen=True)
class FfnRef:
    """One FFN per expert (leading E axis) or a shared FFN (no E axis), weights [D, F] / [F, D].

    GLU activations: act(x @ gate + gate_b) * (x @ up + up_b); plain: act(x @ up + up_b); then
    @ down + down_b. ``gelu_approximate`` picks the tanh or erf GELU.
    """

    activation: str
    up: np.ndarray
    down: np.ndarray
    gate: np.ndarray | None = None
    up_b: np.ndarray | None = None
    gate_b: np.ndarray | None = None
    down_b: np.ndarray | None = None
    gelu_approximate: bool = True


@dataclass(frozen=True)
class BlockRef:
    """A whole block: tokens ``x`` (any leading shape, last axis D), router, routed experts.

    ``shared`` is added to every token, times ``sigmoid(x @ shared_gate)`` when that is given.
    ``capacity``: slots per expert, filled in token order (choices beyond it are dropped).
    ``outputs``: what ``fn`` returns besides the block output, in order ("ids", "logits").
    """

    x: np.ndarray
    router: RouterRef
    experts: FfnRef
    shared: FfnRef | None = None
    shared_gate: np.ndarray | None = None
    capacity: int | None = None
    outputs: tuple[str, ...] = ()


@dataclass
class Blind3Case(ZooCase):
    """A ZooCase with the block's canonical description for the independent reference."""

    ref: BlockRef | None = field(default=None, repr=False)


def _np(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(F32), dtype=np.float64)


def _t(a, *axes) -> np.ndarray:
    return np.transpose(_np(a), axes)


def _init(seed: int, shape: tuple[int, ...], fan_in: int, dtype=None):
    return normal(seed, shape, dtype, scale=fan_in**-0.5)


def _expect(k: int, e: int, activation: str, *, shared: bool = False, capacity: int | None = None) -> dict:
    return {"k": k, "num_experts": e, "activation": activation, "shared_expert": shared, "capacity": capacity}


def _case(name: str, fn, args: tuple, expect: dict, ref: BlockRef, note: str) -> Blind3Case:
    return Blind3Case(name=name, fn=fn, args=args, family=MOE, expect=expect, count=1, note=note, ref=ref)


def _swiglu_ref(gate, up, down, **kw) -> FfnRef:
    return FfnRef("swiglu", up=_np(up), down=_np(down), gate=_np(gate), **kw)


# ---------------------------------------------------------------------------------------------
# 1. Equinox: experts as one stacked module, applied with jax.vmap over the expert axis (the
#    eqx.filter_vmap idiom written as plain jax.vmap); sigmoid spelled 1 / (1 + exp(-x))
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EqxSwiGLU:
    w_gate: jax.Array  # [D, F]  (stacked: [E, D, F])
    w_up: jax.Array
    w_down: jax.Array  # [F, D]

    def __call__(self, x):
        return (jax.nn.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


jax.tree_util.register_dataclass(_EqxSwiGLU, data_fields=["w_gate", "w_up", "w_down"], meta_fields=[])


def make_eqx_vmap_experts_manual_sigmoid() -> Blind3Case:
    """Sigmoid top-2 renormalised router; every expert on every token by vmap over a stacked module."""
    T, D, F, E, K = 16, 32, 64, 8, 2
    x = normal(3001, (T, D))
    router = _init(3002, (D, E), D)
    experts = _EqxSwiGLU(_init(3003, (E, D, F), D), _init(3004, (E, D, F), D), _init(3005, (E, F, D), F))

    def forward(router, experts, x):
        logits = x @ router
        scores = 1 / (1 + jnp.exp(-logits))
        weights, idx = lax.top_k(scores, K)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        outs = jax.vmap(lambda expert: expert(x))(experts)  # [E, T, D]
        combine = (jax.nn.one_hot(idx, E, dtype=x.dtype) * weights[..., None]).sum(axis=1)
        return jnp.einsum("etd,te->td", outs, combine)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(router), K, "sigmoid", renorm=True),
        _swiglu_ref(experts.w_gate, experts.w_up, experts.w_down),
    )
    return _case(
        "eqx_vmap_experts_manual_sigmoid",
        forward,
        (router, experts, x),
        _expect(K, E, "swiglu"),
        ref,
        "Equinox: sigmoid as 1/(1+exp(-x)), top-2 renorm, jax.vmap over a stacked expert module, "
        "one-hot combine",
    )


# ---------------------------------------------------------------------------------------------
# 2. Haiku port of HF Mixtral: softmax as exp(x - logsumexp), loop over experts with where(sel == e)
# ---------------------------------------------------------------------------------------------


def make_haiku_mixtral_logsumexp_loop() -> Blind3Case:
    """Softmax (via logsumexp) top-2 renormalised; Python loop over experts; [B, S, D] tokens."""
    B, S, D, F, E, K = 2, 8, 32, 64, 8, 2
    x = normal(3101, (B, S, D))
    params = {
        "gate": _init(3102, (D, E), D),
        "w1": _init(3103, (E, D, F), D),
        "w3": _init(3104, (E, D, F), D),
        "w2": _init(3105, (E, F, D), F),
    }

    def sparse_moe_block(params, hidden_states):
        b, s, d = hidden_states.shape
        h = hidden_states.reshape(-1, d)
        router_logits = h @ params["gate"]
        routing_probs = jnp.exp(router_logits - jax.nn.logsumexp(router_logits, -1, keepdims=True))
        routing_weights, selected_experts = lax.top_k(routing_probs, K)
        routing_weights = routing_weights / jnp.sum(routing_weights, axis=-1, keepdims=True)
        final = jnp.zeros_like(h)
        for e in range(E):
            w_e = jnp.sum(jnp.where(selected_experts == e, routing_weights, 0.0), axis=-1)
            y = (jax.nn.silu(h @ params["w1"][e]) * (h @ params["w3"][e])) @ params["w2"][e]
            final = final + y * w_e[:, None]
        return final.reshape(b, s, d)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(params["gate"]), K, renorm=True),
        _swiglu_ref(params["w1"], params["w3"], params["w2"]),
    )
    return _case(
        "haiku_mixtral_logsumexp_loop",
        sparse_moe_block,
        (params, x),
        _expect(K, E, "swiglu"),
        ref,
        "Haiku Mixtral port: softmax as exp(x - logsumexp(x)), top-2 renorm, for e in range(E) with "
        "where(sel == e)",
    )


# ---------------------------------------------------------------------------------------------
# 3. Flax linen port of Qwen2-MoE: top-4 without renorm, loop over experts with (sel == e) products,
#    shared expert with a hand-written sigmoid gate
# ---------------------------------------------------------------------------------------------


def make_qwen2_moe_loop_shared_gate() -> Blind3Case:
    """Softmax top-4 (norm_topk_prob=False); loop over 16 experts; shared SwiGLU times sigmoid gate."""
    T, D, F, Fs, E, K = 12, 32, 32, 64, 16, 4
    x = normal(3201, (T, D))
    p = {
        "gate": _init(3202, (D, E), D),
        "gate_proj": _init(3203, (E, D, F), D),
        "up_proj": _init(3204, (E, D, F), D),
        "down_proj": _init(3205, (E, F, D), F),
        "shared_gate_proj": _init(3206, (D, Fs), D),
        "shared_up_proj": _init(3207, (D, Fs), D),
        "shared_down_proj": _init(3208, (Fs, D), Fs),
        "shared_expert_gate": _init(3209, (D, 1), D),
    }

    def qwen2_moe(p, hidden):
        probs = jax.nn.softmax(hidden @ p["gate"], axis=-1)
        topw, sel = lax.top_k(probs, K)
        out = jnp.zeros_like(hidden)
        for e in range(E):
            w_e = (topw * (sel == e)).sum(-1)
            act = jax.nn.silu(hidden @ p["gate_proj"][e]) * (hidden @ p["up_proj"][e])
            out = out + w_e[:, None] * (act @ p["down_proj"][e])
        shared = (jax.nn.silu(hidden @ p["shared_gate_proj"]) * (hidden @ p["shared_up_proj"])) @ p[
            "shared_down_proj"
        ]
        gate = 1.0 / (1.0 + jnp.exp(-(hidden @ p["shared_expert_gate"])))
        return out + gate * shared

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["gate"]), K),
        _swiglu_ref(p["gate_proj"], p["up_proj"], p["down_proj"]),
        shared=_swiglu_ref(p["shared_gate_proj"], p["shared_up_proj"], p["shared_down_proj"]),
        shared_gate=_np(p["shared_expert_gate"])[:, 0],
    )
    return _case(
        "qwen2_moe_loop_shared_gate",
        qwen2_moe,
        (p, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "Qwen2-MoE linen port: softmax top-4 no renorm, loop with (sel == e) products, shared expert "
        "* 1/(1+exp(-g))",
    )


# ---------------------------------------------------------------------------------------------
# 4. OLMoE: top-k by argsort of the negated probabilities, weights by take_along_axis, dense experts
# ---------------------------------------------------------------------------------------------


def make_olmoe_argsort_topk_dense() -> Blind3Case:
    """Softmax, top-2 by argsort(-p)[:, :k] (no renorm); all experts on all tokens; one-hot combine."""
    T, D, F, E, K = 24, 32, 48, 8, 2
    x = normal(3301, (T, D))
    p = {
        "router": _init(3302, (D, E), D),
        "w_gate": _init(3303, (E, D, F), D),
        "w_up": _init(3304, (E, D, F), D),
        "w_down": _init(3305, (E, F, D), F),
    }

    def olmoe_block(p, x):
        probs = jax.nn.softmax(x @ p["router"], axis=-1)
        top_idx = jnp.argsort(-probs, axis=-1)[:, :K]
        top_w = jnp.take_along_axis(probs, top_idx, axis=-1)
        g = jnp.einsum("td,edf->tef", x, p["w_gate"])
        u = jnp.einsum("td,edf->tef", x, p["w_up"])
        y = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, p["w_down"])
        combine = jnp.sum(jax.nn.one_hot(top_idx, E) * top_w[:, :, None], axis=1)
        return jnp.einsum("ted,te->td", y, combine)

    ref = BlockRef(_np(x), RouterRef(_np(p["router"]), K), _swiglu_ref(p["w_gate"], p["w_up"], p["w_down"]))
    return _case(
        "olmoe_argsort_topk_dense",
        olmoe_block,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "OLMoE: softmax, top-k as argsort(-p)[:, :k] + take_along_axis, no renorm, dense einsums, "
        "one-hot combine",
    )


# ---------------------------------------------------------------------------------------------
# 5. DBRX (torch layout): the softmax computed twice (selection and gather); per-token weight gather
# ---------------------------------------------------------------------------------------------


def make_dbrx_scores_twice_gather() -> Blind3Case:
    """Softmax top-4 renormalised, scores recomputed for the gather; experts gathered per token."""
    T, D, F, E, K = 16, 32, 64, 16, 4
    x = normal(3401, (T, D))
    p = {
        "router": _init(3402, (E, D), D),  # nn.Linear(D, E).weight
        "w1": _init(3403, (E, F, D), D),
        "v1": _init(3404, (E, F, D), D),
        "w2": _init(3405, (E, F, D), F),
    }

    def dbrx_ffn(p, x):
        _, top_idx = lax.top_k(jax.nn.softmax(x @ p["router"].T, axis=-1), K)
        top_w = jnp.take_along_axis(jax.nn.softmax(x @ p["router"].T, axis=-1), top_idx, axis=-1)
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        g = jnp.einsum("td,tkfd->tkf", x, p["w1"][top_idx])
        u = jnp.einsum("td,tkfd->tkf", x, p["v1"][top_idx])
        y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, p["w2"][top_idx])
        return jnp.sum(y * top_w[..., None], axis=1)

    ref = BlockRef(
        _np(x),
        RouterRef(_t(p["router"], 1, 0), K, renorm=True),
        _swiglu_ref(_t(p["w1"], 0, 2, 1), _t(p["v1"], 0, 2, 1), p["w2"]),
    )
    return _case(
        "dbrx_scores_twice_gather",
        dbrx_ffn,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "DBRX: softmax computed twice (top_k, then take_along_axis), renorm, torch [E,F,D] weights "
        "gathered per token",
    )


# ---------------------------------------------------------------------------------------------
# 6. hand-written research code: sorted dispatch by jnp.repeat(x, k)[perm] and lax.ragged_dot
# ---------------------------------------------------------------------------------------------


def make_research_repeat_perm_ragged() -> Blind3Case:
    """Softmax top-2 renormalised; tokens repeated k times, sorted by expert, ragged_dot, unsorted."""
    T, D, F, E, K = 16, 32, 64, 8, 2
    x = normal(3501, (T, D))
    p = {
        "router": _init(3502, (D, E), D),
        "wg": _init(3503, (E, D, F), D),
        "wu": _init(3504, (E, D, F), D),
        "wd": _init(3505, (E, F, D), F),
    }

    def moe(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"]), K)
        w = w / w.sum(-1, keepdims=True)
        flat = ids.reshape(-1)
        perm = jnp.argsort(flat)
        xs = jnp.repeat(x, K, axis=0)[perm]
        sizes = jnp.bincount(flat, length=E)
        h = jax.nn.silu(lax.ragged_dot(xs, p["wg"], sizes)) * lax.ragged_dot(xs, p["wu"], sizes)
        ys = lax.ragged_dot(h, p["wd"], sizes)
        y = ys[jnp.argsort(perm)].reshape(T, K, D)
        return jnp.einsum("tkd,tk->td", y, w)

    ref = BlockRef(
        _np(x), RouterRef(_np(p["router"]), K, renorm=True), _swiglu_ref(p["wg"], p["wu"], p["wd"])
    )
    return _case(
        "research_repeat_perm_ragged",
        moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "research code: sorted dispatch jnp.repeat(x, k, axis=0)[perm], bincount sizes, ragged_dot, "
        "argsort(perm) unsort",
    )


# ---------------------------------------------------------------------------------------------
# 7. Praxis-ish dense experts written as x[None] @ W with biases, exact GELU MLP, Switch top-1
# ---------------------------------------------------------------------------------------------


def make_praxis_x_none_matmul_gelu_bias() -> Blind3Case:
    """Softmax top-1 (no renorm); every expert by x[None] @ W + b, erf GELU MLP; where-one-hot combine."""
    T, D, F, E, K = 16, 16, 64, 4, 1
    x = normal(3601, (T, D))
    p = {
        "gating": _init(3602, (D, E), D),
        "wi": _init(3603, (E, D, F), D),
        "bi": normal(3604, (E, F), scale=0.1),
        "wo": _init(3605, (E, F, D), F),
        "bo": normal(3606, (E, D), scale=0.1),
    }

    def moe_layer(p, x):
        probs = jax.nn.softmax(x @ p["gating"], axis=-1)
        gate, idx = lax.top_k(probs, K)
        h = x[None] @ p["wi"] + p["bi"][:, None, :]  # [E, T, F]
        h = jax.nn.gelu(h, approximate=False)
        y = h @ p["wo"] + p["bo"][:, None, :]  # [E, T, D]
        combine = jnp.where(jax.nn.one_hot(idx, E) > 0, gate[..., None], 0.0).sum(1)  # [T, E]
        return jnp.einsum("te,etd->td", combine, y)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["gating"]), K),
        FfnRef(
            "gelu",
            up=_np(p["wi"]),
            down=_np(p["wo"]),
            up_b=_np(p["bi"]),
            down_b=_np(p["bo"]),
            gelu_approximate=False,
        ),
    )
    return _case(
        "praxis_x_none_matmul_gelu_bias",
        moe_layer,
        (p, x),
        _expect(K, E, "gelu"),
        ref,
        "Praxis-ish: top-1 softmax, expert matmul as x[None] @ W + b[:, None], erf GELU MLP, "
        "where(one_hot>0) combine",
    )


# ---------------------------------------------------------------------------------------------
# 8. flaxformer-style MLP experts with a hand-written tanh GELU and einsums with unusual letters
# ---------------------------------------------------------------------------------------------


def _tanh_gelu(a):
    return 0.5 * a * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))


def make_flaxformer_hand_gelu_letters() -> Blind3Case:
    """Softmax top-2 renormalised; dense GELU(tanh, hand-written) MLP experts; einsums 'nm,xmh->xnh'."""
    T, D, F, E, K = 20, 32, 64, 8, 2
    x = normal(3701, (T, D))
    p = {"router": _init(3702, (D, E), D), "wi": _init(3703, (E, D, F), D), "wo": _init(3704, (E, F, D), F)}

    def moe(p, tokens):
        probs = jax.nn.softmax(jnp.einsum("nm,mx->nx", tokens, p["router"]), axis=-1)
        vals, picks = lax.top_k(probs, K)
        vals = vals / vals.sum(-1, keepdims=True)
        hid = _tanh_gelu(jnp.einsum("nm,xmh->xnh", tokens, p["wi"]))
        out = jnp.einsum("xnh,xhm->xnm", hid, p["wo"])
        combine = jnp.einsum("nkx,nk->nx", jax.nn.one_hot(picks, E, dtype=tokens.dtype), vals)
        return jnp.einsum("xnm,nx->nm", out, combine)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K, renorm=True),
        FfnRef("gelu", up=_np(p["wi"]), down=_np(p["wo"])),
    )
    return _case(
        "flaxformer_hand_gelu_letters",
        moe,
        (p, x),
        _expect(K, E, "gelu"),
        ref,
        "flaxformer-ish: hand-written tanh GELU, einsums nm,xmh->xnh / xnh,xhm->xnm, combine einsum "
        "with one-hot",
    )


# ---------------------------------------------------------------------------------------------
# 9. levanter-ish: dense experts, the k outputs picked by take_along_axis over the expert axis
# ---------------------------------------------------------------------------------------------


def make_levanter_take_along_axis_combine() -> Blind3Case:
    """Softmax top-2 renormalised; dense ReLU MLP experts; combine by take_along_axis of [T, E, D]."""
    T, D, F, E, K = 16, 32, 64, 8, 2
    x = normal(3801, (T, D))
    p = {"router": _init(3802, (D, E), D), "up": _init(3803, (E, D, F), D), "down": _init(3804, (E, F, D), F)}

    def moe(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        w = w / w.sum(axis=-1, keepdims=True)
        h = jax.nn.relu(jnp.einsum("bd,edf->bef", x, p["up"]))
        y = jnp.einsum("bef,efd->bed", h, p["down"])  # [T, E, D]
        picked = jnp.take_along_axis(y, ids[:, :, None], axis=1)  # [T, K, D]
        return jnp.sum(picked * w[:, :, None], axis=1)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K, renorm=True),
        FfnRef("relu", up=_np(p["up"]), down=_np(p["down"])),
    )
    return _case(
        "levanter_take_along_axis_combine",
        moe,
        (p, x),
        _expect(K, E, "relu"),
        ref,
        "levanter-ish: dense ReLU experts [T,E,D], the chosen k picked by take_along_axis(y, "
        "ids[..., None], 1)",
    )


# ---------------------------------------------------------------------------------------------
# 10. Flax linen Mixtral port applied per sequence under an outer jax.vmap over the batch
# ---------------------------------------------------------------------------------------------


def make_linen_vmap_batch_loop_experts() -> Blind3Case:
    """jax.vmap over B of a per-sequence block: softmax top-2 renorm, loop over experts (einsum mask)."""
    B, S, D, F, E, K = 2, 8, 16, 32, 4, 2
    x = normal(3901, (B, S, D))
    p = {
        "router": _init(3902, (D, E), D),
        "w1": _init(3903, (E, D, F), D),
        "w3": _init(3904, (E, D, F), D),
        "w2": _init(3905, (E, F, D), F),
    }

    def moe_seq(p, h):  # h: [S, D]
        rw, sel = lax.top_k(jax.nn.softmax(h @ p["router"], axis=-1), K)
        rw = rw / jnp.sum(rw, axis=-1, keepdims=True)
        out = jnp.zeros_like(h)
        for e in range(E):
            mask = (sel == e).astype(h.dtype)
            w_e = jnp.einsum("sk,sk->s", mask, rw)
            y = (jax.nn.silu(h @ p["w1"][e]) * (h @ p["w3"][e])) @ p["w2"][e]
            out = out + w_e[:, None] * y
        return out

    def forward(p, x):
        return jax.vmap(moe_seq, in_axes=(None, 0))(p, x)

    ref = BlockRef(
        _np(x), RouterRef(_np(p["router"]), K, renorm=True), _swiglu_ref(p["w1"], p["w3"], p["w2"])
    )
    return _case(
        "linen_vmap_batch_loop_experts",
        forward,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "linen Mixtral port: per-sequence loop-over-experts block under jax.vmap over the batch",
    )


# ---------------------------------------------------------------------------------------------
# 11. DeepSeek-V3 MoEGate (Flax port, my own way): group-limited sigmoid routing with correction
#     bias, masked_fill 0.0, routed scaling; experts gathered per token; shared expert
# ---------------------------------------------------------------------------------------------


def make_deepseek_v3_groups_gather_shared() -> Blind3Case:
    """Sigmoid + bias (selection only), 4 groups keep 2 by top-2 sum, fill 0.0, top-4, renorm, x2.5."""
    T, D, F, E, K, G, TG = 16, 32, 32, 16, 4, 4, 2
    x = normal(4001, (T, D))
    p = {
        "gate_w": _init(4002, (D, E), D),
        "e_score_correction_bias": normal(4003, (E,), scale=0.1),
        "w_gate": _init(4004, (E, D, F), D),
        "w_up": _init(4005, (E, D, F), D),
        "w_down": _init(4006, (E, F, D), F),
        "s_gate": _init(4007, (D, 2 * F), D),
        "s_up": _init(4008, (D, 2 * F), D),
        "s_down": _init(4009, (2 * F, D), 2 * F),
    }

    def moe_gate(p, h):
        t = h.shape[0]
        scores = jax.nn.sigmoid((h @ p["gate_w"]).astype(F32))
        for_choice = scores + p["e_score_correction_bias"][None, :]
        per_group = for_choice.reshape(t, G, E // G)
        group_scores = lax.top_k(per_group, 2)[0].sum(-1)  # [T, G]
        _, group_idx = lax.top_k(group_scores, TG)
        group_mask = jax.nn.one_hot(group_idx, G).sum(1)  # [T, G]
        expert_mask = jnp.broadcast_to(group_mask[:, :, None], (t, G, E // G)).reshape(t, E)
        masked = jnp.where(expert_mask > 0, for_choice, 0.0)
        _, topk_idx = lax.top_k(masked, K)
        topk_w = jnp.take_along_axis(scores, topk_idx, axis=1)
        topk_w = topk_w / (topk_w.sum(-1, keepdims=True) + 1e-20)
        return topk_idx, topk_w * 2.5

    def deepseek_moe(p, h):
        ids, w = moe_gate(p, h)
        g = jnp.einsum("td,tkdf->tkf", h, p["w_gate"][ids])
        u = jnp.einsum("td,tkdf->tkf", h, p["w_up"][ids])
        y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, p["w_down"][ids])
        routed = jnp.einsum("tkd,tk->td", y, w.astype(h.dtype))
        shared = (jax.nn.silu(h @ p["s_gate"]) * (h @ p["s_up"])) @ p["s_down"]
        return routed + shared

    ref = BlockRef(
        _np(x),
        RouterRef(
            _np(p["gate_w"]),
            K,
            "sigmoid",
            renorm=True,
            renorm_eps=1e-20,
            scale=2.5,
            selection_bias=_np(p["e_score_correction_bias"]),
            n_group=G,
            topk_group=TG,
            group_fill=0.0,
        ),
        _swiglu_ref(p["w_gate"], p["w_up"], p["w_down"]),
        shared=_swiglu_ref(p["s_gate"], p["s_up"], p["s_down"]),
    )
    return _case(
        "deepseek_v3_groups_gather_shared",
        deepseek_moe,
        (p, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "DeepSeek-V3 gate: sigmoid+bias, group top-2-sum, one_hot-sum group mask broadcast, fill "
        "0.0, renorm, x2.5; "
        "per-token gather; shared",
    )


# ---------------------------------------------------------------------------------------------
# 12. Ling-style group-limited sigmoid router (f32) over bf16 experts, loop over experts
# ---------------------------------------------------------------------------------------------


def make_ling_groups_bf16_loop() -> Blind3Case:
    """1/(1+exp(-x)) + bias, 4 groups keep 2 (sorted last two), fill -inf, top-2, renorm, x2.5; bf16."""
    T, D, F, E, K, G, TG = 16, 32, 64, 8, 2, 4, 2
    x = normal(4101, (T, D), BF16)
    p = {
        "router": _init(4102, (D, E), D),  # f32
        "bias": normal(4103, (E,), scale=0.1),
        "gate": _init(4104, (E, D, F), D, BF16),
        "up": _init(4105, (E, D, F), D, BF16),
        "down": _init(4106, (E, F, D), F, BF16),
        "sh_gate": _init(4107, (D, F), D, BF16),
        "sh_up": _init(4108, (D, F), D, BF16),
        "sh_down": _init(4109, (F, D), F, BF16),
    }

    def ling_moe(p, x):
        logits = x.astype(F32) @ p["router"]
        s = 1.0 / (1.0 + jnp.exp(-logits))
        biased = s + p["bias"]
        grouped = biased.reshape(T, G, E // G)
        gscore = jnp.sort(grouped, axis=-1)[..., -2:].sum(-1)
        _, gsel = lax.top_k(gscore, TG)
        keep = (gsel[:, :, None] == jnp.arange(G)[None, None, :]).any(axis=1)  # [T, G]
        keep = jnp.repeat(keep, E // G, axis=-1)
        _, ids = lax.top_k(jnp.where(keep, biased, -jnp.inf), K)
        w = jnp.take_along_axis(s, ids, axis=-1)
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20) * 2.5
        out = jnp.zeros(x.shape, F32)
        for e in range(E):
            w_e = jnp.sum(jnp.where(ids == e, w, 0.0), axis=-1)
            h = jax.nn.silu(x @ p["gate"][e]) * (x @ p["up"][e])
            out = out + (h @ p["down"][e]).astype(F32) * w_e[:, None]
        shared = (jax.nn.silu(x @ p["sh_gate"]) * (x @ p["sh_up"])) @ p["sh_down"]
        return (out + shared.astype(F32)).astype(x.dtype)

    ref = BlockRef(
        _np(x),
        RouterRef(
            _np(p["router"]),
            K,
            "sigmoid",
            renorm=True,
            renorm_eps=1e-20,
            scale=2.5,
            selection_bias=_np(p["bias"]),
            n_group=G,
            topk_group=TG,
        ),
        _swiglu_ref(p["gate"], p["up"], p["down"]),
        shared=_swiglu_ref(p["sh_gate"], p["sh_up"], p["sh_down"]),
    )
    return _case(
        "ling_groups_bf16_loop",
        ling_moe,
        (p, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "Ling-style: f32 router 1/(1+exp(-x))+bias, group score = last two of jnp.sort, ==arange().any mask, "
        "-inf fill; bf16 experts in a loop; shared",
    )


# ---------------------------------------------------------------------------------------------
# 13. t5x / flaxformer Switch: top-1 tokens-choose with expert capacity (token dropping)
# ---------------------------------------------------------------------------------------------


def make_switch_t5x_top1_capacity() -> Blind3Case:
    """Softmax top-1, capacity 3 per expert filled in token order (drops), ReLU MLP experts."""
    T, D, F, E, K, C = 16, 16, 32, 4, 1, 3
    x = normal(4201, (T, D))
    p = {"router": _init(4202, (D, E), D), "wi": _init(4203, (E, D, F), D), "wo": _init(4204, (E, F, D), F)}

    def switch_layer(p, x):
        router_probs = jax.nn.softmax(x @ p["router"], axis=-1)
        expert_gate, expert_index = lax.top_k(router_probs, K)
        expert_mask = jax.nn.one_hot(expert_index[:, 0], E, dtype=jnp.int32)  # [T, E]
        token_priority = jnp.cumsum(expert_mask, axis=0) * expert_mask - 1
        dispatch_mask = jax.nn.one_hot(token_priority, C, dtype=x.dtype)  # [T, E, C]; -1 and >= C are 0
        combine_array = dispatch_mask * expert_gate[:, 0][:, None, None]
        expert_inputs = jnp.einsum("tec,td->ecd", dispatch_mask, x)
        h = jax.nn.relu(jnp.einsum("ecd,edf->ecf", expert_inputs, p["wi"]))
        expert_outputs = jnp.einsum("ecf,efd->ecd", h, p["wo"])
        return jnp.einsum("tec,ecd->td", combine_array, expert_outputs), expert_index

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K),
        FfnRef("relu", up=_np(p["wi"]), down=_np(p["wo"])),
        capacity=C,
        outputs=("ids",),
    )
    return _case(
        "switch_t5x_top1_capacity",
        switch_layer,
        (p, x),
        _expect(K, E, "relu", capacity=C),
        ref,
        "t5x Switch: top-1, token_priority = cumsum(mask)*mask - 1, dispatch one_hot(priority, C), "
        "[e,c,d] experts",
    )


# ---------------------------------------------------------------------------------------------
# 14. JetMoE: top-k of the logits then softmax over the k; fused gate/up gathered per token,
#     einsums with unusual letters
# ---------------------------------------------------------------------------------------------


def make_jetmoe_topk_softmax_gather_fused() -> Blind3Case:
    """Top-2 of the logits, softmax over the 2; concatenated [gate | up] weights gathered per token; GeGLU."""
    T, D, F, E, K = 12, 32, 48, 8, 2
    x = normal(4301, (T, D))
    p = {
        "router": _init(4302, (D, E), D),
        "w_in": _init(4303, (E, D, 2 * F), D),
        "w_out": _init(4304, (E, F, D), F),
    }

    def jet(p, x):
        top_logits, ids = lax.top_k(x @ p["router"], K)
        gates = jax.nn.softmax(top_logits, axis=-1)
        hcat = jnp.einsum("bi,bkio->bko", x, p["w_in"][ids])
        g, u = jnp.split(hcat, 2, axis=-1)
        y = jnp.einsum("bkh,bkhi->bki", jax.nn.gelu(g) * u, p["w_out"][ids])
        return jnp.einsum("bki,bk->bi", y, gates)

    w_in = _np(p["w_in"])
    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K, order="topk_then_score"),
        FfnRef("geglu", up=w_in[..., F:], down=_np(p["w_out"]), gate=w_in[..., :F]),
    )
    return _case(
        "jetmoe_topk_softmax_gather_fused",
        jet,
        (p, x),
        _expect(K, E, "geglu"),
        ref,
        "JetMoE-ish: top-k logits -> softmax over k; [gate|up] gathered per token, jnp.split, "
        "einsums bi,bkio->bko",
    )


# ---------------------------------------------------------------------------------------------
# 15. Grok-1 (Haiku): f32 router softmax top-2 (no renorm), bf16 experts gathered by jnp.take
# ---------------------------------------------------------------------------------------------


def make_grok_take_gather_geglu_bf16() -> Blind3Case:
    """f32 softmax top-2 no renorm; bf16 GeGLU experts gathered with jnp.take; [B, S, D] tokens."""
    B, S, D, F, E, K = 2, 8, 32, 64, 8, 2
    x = normal(4401, (B, S, D), BF16)
    p = {
        "router": _init(4402, (D, E), D),
        "linear": _init(4403, (E, D, F), D, BF16),
        "linear_v": _init(4404, (E, D, F), D, BF16),
        "linear_1": _init(4405, (E, F, D), F, BF16),
    }

    def grok_moe(p, inputs):
        routing_probs = jax.nn.softmax(inputs.astype(F32) @ p["router"], axis=-1)
        expert_gate, expert_index = lax.top_k(routing_probs, K)
        wg = jnp.take(p["linear"], expert_index, axis=0)  # [B, S, K, D, F]
        wv = jnp.take(p["linear_v"], expert_index, axis=0)
        wo = jnp.take(p["linear_1"], expert_index, axis=0)
        h = jax.nn.gelu(jnp.einsum("bsd,bskdf->bskf", inputs, wg)) * jnp.einsum("bsd,bskdf->bskf", inputs, wv)
        y = jnp.einsum("bskf,bskfd->bskd", h, wo)
        return jnp.sum(y * expert_gate[..., None].astype(y.dtype), axis=-2)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K),
        FfnRef("geglu", up=_np(p["linear_v"]), down=_np(p["linear_1"]), gate=_np(p["linear"])),
    )
    return _case(
        "grok_take_gather_geglu_bf16",
        grok_moe,
        (p, x),
        _expect(K, E, "geglu"),
        ref,
        "Grok-1 Haiku-ish: f32 router softmax top-2, bf16 GeGLU experts via jnp.take(w, ids, 0), [B,S,D]",
    )


# ---------------------------------------------------------------------------------------------
# 16. Arctic: dense residual MLP next to a top-2 MoE; sorted dispatch x[perm // k], one-hot group
#     sizes, unpermute by scatter
# ---------------------------------------------------------------------------------------------


def make_arctic_residual_sorted_scatter() -> Blind3Case:
    """Softmax top-2 renorm; sorted ragged_dot experts; unsorted by .at[perm].set; plus a dense MLP."""
    T, D, F, E, K = 16, 32, 32, 8, 2
    x = normal(4501, (T, D))
    p = {
        "router": _init(4502, (D, E), D),
        "w1": _init(4503, (E, D, F), D),
        "w3": _init(4504, (E, D, F), D),
        "w2": _init(4505, (E, F, D), F),
        "res_w1": _init(4506, (D, 2 * F), D),
        "res_w3": _init(4507, (D, 2 * F), D),
        "res_w2": _init(4508, (2 * F, D), 2 * F),
    }

    def arctic_block(p, x):
        rw, sel = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        rw = rw / rw.sum(-1, keepdims=True)
        flat = sel.ravel()
        perm = jnp.argsort(flat)
        xs = x[perm // K]
        counts = jnp.sum(jax.nn.one_hot(flat, E, dtype=jnp.int32), axis=0)
        h = jax.nn.silu(lax.ragged_dot(xs, p["w1"], counts)) * lax.ragged_dot(xs, p["w3"], counts)
        ys = lax.ragged_dot(h, p["w2"], counts)
        y = jnp.zeros_like(ys).at[perm].set(ys).reshape(T, K, D)
        moe_out = (y * rw[..., None]).sum(1)
        residual = (jax.nn.silu(x @ p["res_w1"]) * (x @ p["res_w3"])) @ p["res_w2"]
        return residual + moe_out

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K, renorm=True),
        _swiglu_ref(p["w1"], p["w3"], p["w2"]),
        shared=_swiglu_ref(p["res_w1"], p["res_w3"], p["res_w2"]),
    )
    return _case(
        "arctic_residual_sorted_scatter",
        arctic_block,
        (p, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "Arctic: dense residual SwiGLU + top-2 MoE; x[perm // k], one-hot-sum sizes, ragged_dot, "
        ".at[perm].set unsort",
    )


# ---------------------------------------------------------------------------------------------
# 17. Jamba (HF port): bf16 hidden, f32 router, softmax top-2 without renorm, loop over experts,
#     returns (out, router_logits)
# ---------------------------------------------------------------------------------------------


def make_jamba_bf16_loop_f32_router() -> Blind3Case:
    """f32 softmax top-2 (no renorm); bf16 SwiGLU experts in a loop; [B, S, D]; also returns the logits."""
    B, S, D, F, E, K = 2, 8, 32, 64, 8, 2
    x = normal(4601, (B, S, D), BF16)
    p = {
        "router": _init(4602, (D, E), D),
        "gate_proj": _init(4603, (E, D, F), D, BF16),
        "up_proj": _init(4604, (E, D, F), D, BF16),
        "down_proj": _init(4605, (E, F, D), F, BF16),
    }

    def jamba_moe(p, hidden_states):
        b, s, d = hidden_states.shape
        h = hidden_states.reshape(b * s, d)
        router_logits = h.astype(F32) @ p["router"]
        routing_weights = jax.nn.softmax(router_logits, axis=1)
        routing_weights, selected = lax.top_k(routing_weights, K)
        routing_weights = routing_weights.astype(h.dtype)
        final = jnp.zeros((b * s, d), h.dtype)
        for e in range(E):
            w_e = jnp.sum(routing_weights * (selected == e).astype(h.dtype), axis=-1)
            y = (jax.nn.silu(h @ p["gate_proj"][e]) * (h @ p["up_proj"][e])) @ p["down_proj"][e]
            final = final + y * w_e[:, None]
        return final.reshape(b, s, d), router_logits

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K),
        _swiglu_ref(p["gate_proj"], p["up_proj"], p["down_proj"]),
        outputs=("logits",),
    )
    return _case(
        "jamba_bf16_loop_f32_router",
        jamba_moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "Jamba HF port: f32 router softmax top-2 cast to bf16, bf16 loop over experts, returns (out, "
        "router_logits)",
    )


# ---------------------------------------------------------------------------------------------
# 18. DeepSeek-V2: softmax greedy top-k, no renorm, routed_scaling_factor; shared experts; dense
#     einsums with upper-case letters; combine matrix by scatter
# ---------------------------------------------------------------------------------------------


def make_deepseek_v2_scale_scatter_dense() -> Blind3Case:
    """Softmax top-3 (no renorm) x 16.0; dense experts 'TD,EDF->TEF'; [T, E] combine by .at[].set."""
    T, D, F, E, K = 16, 32, 32, 8, 3
    x = normal(4701, (T, D))
    p = {
        "gate": _init(4702, (D, E), D),
        "gate_proj": _init(4703, (E, D, F), D),
        "up_proj": _init(4704, (E, D, F), D),
        "down_proj": _init(4705, (E, F, D), F),
        "shared_gate": _init(4706, (D, 2 * F), D),
        "shared_up": _init(4707, (D, 2 * F), D),
        "shared_down": _init(4708, (2 * F, D), 2 * F),
    }

    def deepseek_v2_moe(p, x):
        scores = jax.nn.softmax(x @ p["gate"], axis=-1)
        topk_weight, topk_idx = lax.top_k(scores, K)
        topk_weight = topk_weight * 16.0
        combine = jnp.zeros((T, E), x.dtype).at[jnp.arange(T)[:, None], topk_idx].set(topk_weight)
        G = jnp.einsum("TD,EDF->TEF", x, p["gate_proj"])
        U = jnp.einsum("TD,EDF->TEF", x, p["up_proj"])
        Y = jnp.einsum("TEF,EFD->TED", jax.nn.silu(G) * U, p["down_proj"])
        routed = jnp.einsum("TED,TE->TD", Y, combine)
        shared = (jax.nn.silu(x @ p["shared_gate"]) * (x @ p["shared_up"])) @ p["shared_down"]
        return routed + shared

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["gate"]), K, scale=16.0),
        _swiglu_ref(p["gate_proj"], p["up_proj"], p["down_proj"]),
        shared=_swiglu_ref(p["shared_gate"], p["shared_up"], p["shared_down"]),
    )
    return _case(
        "deepseek_v2_scale_scatter_dense",
        deepseek_v2_moe,
        (p, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "DeepSeek-V2: softmax top-3 no renorm x16, upper-case einsums TD,EDF->TEF, combine "
        ".at[arange, ids].set(w), "
        "shared",
    )


# ---------------------------------------------------------------------------------------------
# 19. keras-jax style: sigmoid top-2 (no renorm), sorted dispatch, plain SiLU MLP experts,
#     inverse permutation built by a scatter
# ---------------------------------------------------------------------------------------------


def make_keras_sorted_inverse_scatter_silu() -> Blind3Case:
    """Sigmoid top-2 no renorm; sorted x[perm // k] + ragged_dot SiLU MLP; inverse perm by .at[perm].set."""
    T, D, F, E, K = 16, 32, 64, 8, 2
    x = normal(4801, (T, D))
    p = {"router": _init(4802, (D, E), D), "up": _init(4803, (E, D, F), D), "down": _init(4804, (E, F, D), F)}

    def call(p, inputs):
        weights, experts = lax.top_k(jax.nn.sigmoid(jnp.matmul(inputs, p["router"])), K)
        flat = jnp.reshape(experts, (-1,))
        order = jnp.argsort(flat)
        sorted_inputs = jnp.take(inputs, order // K, axis=0)
        group_sizes = jnp.bincount(flat, length=E)
        hidden = jax.nn.silu(lax.ragged_dot(sorted_inputs, p["up"], group_sizes))
        sorted_out = lax.ragged_dot(hidden, p["down"], group_sizes)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
        out = jnp.take(sorted_out, inverse, axis=0).reshape(T, K, D)
        return jnp.sum(out * weights[:, :, None], axis=1)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K, "sigmoid"),
        FfnRef("silu", up=_np(p["up"]), down=_np(p["down"])),
    )
    return _case(
        "keras_sorted_inverse_scatter_silu",
        call,
        (p, x),
        _expect(K, E, "silu"),
        ref,
        "keras-jax ops style: sigmoid top-2, jnp.take(x, order // k), ragged_dot SiLU MLP, inverse "
        "perm by scatter",
    )


# ---------------------------------------------------------------------------------------------
# 20. research code: loop over the k slots, each gathering its expert's torch-layout weights
# ---------------------------------------------------------------------------------------------


def make_research_slot_loop_torch_gather() -> Blind3Case:
    """Softmax top-2 renorm; for j in range(k): einsum('tfd,td->tf', W[ids[:, j]], x); SwiGLU."""
    T, D, F, E, K = 16, 32, 48, 8, 2
    x = normal(4901, (T, D))
    p = {
        "router": _init(4902, (D, E), D),
        "w1": _init(4903, (E, F, D), D),  # torch [out, in]
        "w3": _init(4904, (E, F, D), D),
        "w2": _init(4905, (E, D, F), F),
    }

    def moe(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        w = w / w.sum(-1, keepdims=True)
        out = jnp.zeros_like(x)
        for j in range(K):
            e = ids[:, j]
            g = jnp.einsum("tfd,td->tf", p["w1"][e], x)
            u = jnp.einsum("tfd,td->tf", p["w3"][e], x)
            y = jnp.einsum("tdf,tf->td", p["w2"][e], jax.nn.silu(g) * u)
            out = out + w[:, j : j + 1] * y
        return out

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K, renorm=True),
        _swiglu_ref(_t(p["w1"], 0, 2, 1), _t(p["w3"], 0, 2, 1), _t(p["w2"], 0, 2, 1)),
    )
    return _case(
        "research_slot_loop_torch_gather",
        moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "research code: loop over the k slots, torch-layout weights gathered W[ids[:, j]], einsum tfd,td->tf",
    )


# ---------------------------------------------------------------------------------------------
# 21. Praxis / GShard without capacity: grouped tokens [G, S, M], einsum one-hot combine, GeGLU (erf),
#     renorm with an epsilon
# ---------------------------------------------------------------------------------------------


def make_praxis_grouped_tokens_geglu() -> Blind3Case:
    """Softmax top-2, w / (sum + 1e-9); tokens [G, S, M]; dense 'GSM,EMH->GSEH'; exact GeGLU."""
    G_, S, D, F, E, K = 2, 8, 16, 32, 4, 2
    x = normal(5001, (G_, S, D))
    p = {
        "gate": _init(5002, (D, E), D),
        "wi_gate": _init(5003, (E, D, F), D),
        "wi_up": _init(5004, (E, D, F), D),
        "wo": _init(5005, (E, F, D), F),
    }

    def gshard_moe(p, inputs):
        logits = jnp.einsum("GSM,ME->GSE", inputs, p["gate"])
        raw_gates = jax.nn.softmax(logits, axis=-1)
        gates, idx = lax.top_k(raw_gates, K)
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-9)
        combine = jnp.einsum("GSKE,GSK->GSE", jax.nn.one_hot(idx, E, dtype=inputs.dtype), gates)
        hg = jnp.einsum("GSM,EMH->GSEH", inputs, p["wi_gate"])
        hu = jnp.einsum("GSM,EMH->GSEH", inputs, p["wi_up"])
        out = jnp.einsum("GSEH,EHM->GSEM", jax.nn.gelu(hg, approximate=False) * hu, p["wo"])
        return jnp.einsum("GSEM,GSE->GSM", out, combine)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["gate"]), K, renorm=True, renorm_eps=1e-9),
        FfnRef(
            "geglu", up=_np(p["wi_up"]), down=_np(p["wo"]), gate=_np(p["wi_gate"]), gelu_approximate=False
        ),
    )
    return _case(
        "praxis_grouped_tokens_geglu",
        gshard_moe,
        (p, x),
        _expect(K, E, "geglu"),
        ref,
        "Praxis/GShard, no capacity: tokens [G,S,M], renorm + 1e-9, einsum one-hot combine "
        "GSKE,GSK->GSE, erf GeGLU",
    )


# ---------------------------------------------------------------------------------------------
# 22. sigmoid + correction bias without groups, sigmoid computed twice, experts by vmap (out_axes=1)
# ---------------------------------------------------------------------------------------------


def make_sigmoid_bias_twice_vmap_experts() -> Blind3Case:
    """Sigmoid top-4 with selection-only bias (sigmoid recomputed for the weights), renorm; vmap experts."""
    T, D, F, E, K = 16, 32, 32, 16, 4
    x = normal(5101, (T, D))
    p = {
        "router": _init(5102, (D, E), D),
        "bias": normal(5103, (E,), scale=0.1),
        "wg": _init(5104, (E, D, F), D),
        "wu": _init(5105, (E, D, F), D),
        "wd": _init(5106, (E, F, D), F),
    }

    def ffn(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    def moe(p, x):
        logits = x @ p["router"]
        _, ids = lax.top_k(jax.nn.sigmoid(logits) + p["bias"], K)
        w = jnp.take_along_axis(jax.nn.sigmoid(logits), ids, axis=-1)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        y = jax.vmap(ffn, in_axes=(None, 0, 0, 0), out_axes=1)(x, p["wg"], p["wu"], p["wd"])  # [T, E, D]
        combine = (jax.nn.one_hot(ids, E) * w[..., None]).sum(-2)
        return jnp.einsum("ted,te->td", y, combine)

    ref = BlockRef(
        _np(x),
        RouterRef(_np(p["router"]), K, "sigmoid", renorm=True, selection_bias=_np(p["bias"])),
        _swiglu_ref(p["wg"], p["wu"], p["wd"]),
    )
    return _case(
        "sigmoid_bias_twice_vmap_experts",
        moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "aux-loss-free sigmoid router (bias for selection only), sigmoid computed twice; "
        "vmap(out_axes=1) experts",
    )


BLIND3_MOE_BLOCKS = [
    make_eqx_vmap_experts_manual_sigmoid,
    make_haiku_mixtral_logsumexp_loop,
    make_qwen2_moe_loop_shared_gate,
    make_olmoe_argsort_topk_dense,
    make_dbrx_scores_twice_gather,
    make_research_repeat_perm_ragged,
    make_praxis_x_none_matmul_gelu_bias,
    make_flaxformer_hand_gelu_letters,
    make_levanter_take_along_axis_combine,
    make_linen_vmap_batch_loop_experts,
    make_deepseek_v3_groups_gather_shared,
    make_ling_groups_bf16_loop,
    make_switch_t5x_top1_capacity,
    make_jetmoe_topk_softmax_gather_fused,
    make_grok_take_gather_geglu_bf16,
    make_arctic_residual_sorted_scatter,
    make_jamba_bf16_loop_f32_router,
    make_deepseek_v2_scale_scatter_dense,
    make_keras_sorted_inverse_scatter_silu,
    make_research_slot_loop_torch_gather,
    make_praxis_grouped_tokens_geglu,
    make_sigmoid_bias_twice_vmap_experts,
]
