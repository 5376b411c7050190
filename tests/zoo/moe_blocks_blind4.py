"""A fourth, blind batch of whole MoE blocks (router + routed experts + combine, some with a shared expert).

Written from a description of what each block computes, without reading the matcher, in spellings of
libraries other than MaxText / EasyDeL / tpu-inference / SGLang-JAX: Equinox, Haiku, Flax linen and NNX
ports of PyTorch HF code (Mixtral, Qwen2-MoE, PhiMoE, Llama-4), keras-jax and hand-written research
code. Four themes:

1. experts kept as separate modules / separate per-expert arrays (Python lists of modules or weight
   dicts, torch ``[out, in]`` layouts with ``.T``, a per-expert ``nn.Dense`` / ``nnx.Linear``), combined
   by a loop over the experts whose per-expert weight comes from ``ids == e`` in several spellings;
2. the routing weight applied to the token BEFORE the expert (Llama-4: top-1 of the logits, sigmoid of
   the chosen logit, ``expert(x * w)``, the outputs summed unweighted), dense, sorted and loop spellings;
3. routers without ``lax.top_k``: argmax twice, argsort, PhiMoE's SparseMixer top-2;
4. respellings a user writes without thinking (score computed twice, fancy indexing, einsum letters,
   ``x @ W.T``, GELU written through a sigmoid, ``einsum('tkd->td')``, bf16 round trips, top-1 without
   renormalisation).

Each ``make_<name>()`` returns a :class:`tests.zoo.moe_blocks_blind3.Blind3Case` whose ``expect`` holds the
block's true parameters and whose ``ref`` (a :class:`Block4Ref`) describes the same block in canonical
layout, for the independent per-token reference in ``test_moe_blind4_selfcheck.py``.

Example::

    case = make_llama4_dense_scatter_sigmoid_on_input()
    y = jax.jit(case.fn)(*case.args)

``expect`` keys: ``k``, ``num_experts``, ``activation`` ("swiglu" | "geglu" | "gelu" | "relu" | "silu"),
``shared_expert`` (bool), ``capacity`` (slots per expert, or None) as in blind3, plus
``weights_on_input`` (bool): True when the routing weight multiplies the token before the expert FFN and
the k expert outputs are summed unweighted, ``out[t] = sum_j FFN_{ids[t, j]}(x[t] * w[t, j])``, instead of
``sum_j w[t, j] * FFN_{ids[t, j]}(x[t])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax import lax

from . import normal
from .moe_blocks_blind3 import MOE, Blind3Case, BlockRef, FfnRef, RouterRef, _init, _np, _swiglu_ref, _t

F32 = jnp.float32
BF16 = jnp.bfloat16


@dataclass(frozen=True)
class Router4Ref(RouterRef):
    """:class:`RouterRef` plus the two routings blind3 does not describe.

    order "topk_then_score" with score "sigmoid": top-k of the logits, each chosen logit through a
    sigmoid on its own (Llama-4); with score "softmax" it stays blind3's softmax over the k logits.
    order "sparsemixer" (k = 2, PhiMoE's inference path), for one token's logits s [E], eps = jitter_eps:
      slot 0: m = max(s), i0 = argmax(s) (ties: lower id); keep = {i : (m - s_i) / max(|s_i|, m) <= 2 eps};
              w0 = exp(s_i0) / sum_{i in keep} exp(s_i)
      slot 1: s' = s with s'_i0 = -inf; m' = max(s'), i1 = argmax(s');
              keep' = {i != i0 : (m' - s_i) / max(|s_i|, m') <= 2 eps}; w1 = exp(s_i1) / sum_{keep'} exp(s_i)
      no renormalisation of (w0, w1).
    """

    jitter_eps: float = 0.0


@dataclass(frozen=True)
class Block4Ref(BlockRef):
    """:class:`BlockRef` plus ``weights_on_input`` (see the module docstring)."""

    weights_on_input: bool = False


def _expect(k: int, e: int, activation: str, *, shared: bool = False, on_input: bool = False) -> dict:
    return {
        "k": k,
        "num_experts": e,
        "activation": activation,
        "shared_expert": shared,
        "capacity": None,
        "weights_on_input": on_input,
    }


def _case(name: str, fn, args: tuple, expect: dict, ref: Block4Ref, note: str) -> Blind3Case:
    return Blind3Case(name=name, fn=fn, args=args, family=MOE, expect=expect, count=1, note=note, ref=ref)


def _stack_np(arrays, *axes) -> np.ndarray:
    """Per-expert arrays stacked on a new leading E axis, each transposed by ``axes`` (if given)."""
    return np.stack([_t(a, *axes) if axes else _np(a) for a in arrays])


def _pytree(cls):
    """Register a frozen dataclass whose every field is an array or a sub-module as a pytree."""
    names = list(cls.__dataclass_fields__)
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


# ---------------------------------------------------------------------------------------------
# 1. Equinox Mixtral port: a Python list of per-expert modules, eqx.nn.Linear [out, in] weights
#    applied as x @ W.T; per-expert weight jnp.where(ids == e, w, 0).sum(-1)
# ---------------------------------------------------------------------------------------------


@_pytree
@dataclass(frozen=True)
class _EqxLinear:
    weight: jax.Array  # [out, in]  (eqx.nn.Linear / torch nn.Linear layout)

    def __call__(self, x):
        return x @ self.weight.T


@_pytree
@dataclass(frozen=True)
class _EqxMixtralExpert:
    w1: _EqxLinear
    w3: _EqxLinear
    w2: _EqxLinear

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


@_pytree
@dataclass(frozen=True)
class _EqxSparseMoe:
    gate: _EqxLinear
    experts: tuple  # of _EqxMixtralExpert

    def __call__(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = jax.nn.softmax(self.gate(h), axis=-1)
        w, ids = lax.top_k(probs, 2)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        out = jnp.zeros_like(h)
        for e, expert in enumerate(self.experts):
            w_e = jnp.where(ids == e, w, 0.0).sum(axis=-1)
            out = out + w_e[:, None] * expert(h)
        return out.reshape(x.shape)


def make_eqx_expert_modules_torch_linear_where() -> Blind3Case:
    """Softmax top-2 renorm; a tuple of 6 expert modules with [out, in] weights; loop with where(ids == e)."""
    B, S, D, F, E, K = 2, 8, 32, 48, 6, 2
    x = normal(6001, (B, S, D))
    gate = _EqxLinear(_init(6002, (E, D), D))
    experts = tuple(
        _EqxMixtralExpert(
            _EqxLinear(_init(6010 + 3 * e, (F, D), D)),
            _EqxLinear(_init(6011 + 3 * e, (F, D), D)),
            _EqxLinear(_init(6012 + 3 * e, (D, F), F)),
        )
        for e in range(E)
    )
    model = _EqxSparseMoe(gate, experts)

    def forward(model, x):
        return model(x)

    ref = Block4Ref(
        _np(x),
        RouterRef(_t(gate.weight, 1, 0), K, renorm=True),
        FfnRef(
            "swiglu",
            gate=_stack_np([ex.w1.weight for ex in experts], 1, 0),
            up=_stack_np([ex.w3.weight for ex in experts], 1, 0),
            down=_stack_np([ex.w2.weight for ex in experts], 1, 0),
        ),
    )
    return _case(
        "eqx_expert_modules_torch_linear_where",
        forward,
        (model, x),
        _expect(K, E, "swiglu"),
        ref,
        "Equinox Mixtral: tuple of per-expert modules, x @ W.T with [out, in] weights, loop with "
        "where(ids == e, w, 0).sum(-1); E = 6",
    )


# ---------------------------------------------------------------------------------------------
# 2. Flax linen: one nn.Dense pair per expert (named submodules with biases), exact GELU MLP,
#    per-expert weight from a column of the one-hot dispatch tensor
# ---------------------------------------------------------------------------------------------


class _LinenMlpExpert(nn.Module):
    hidden: int
    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        return nn.Dense(self.features, name="fc2")(h)


class _LinenLoopMoe(nn.Module):
    num_experts: int
    top_k: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(self.num_experts, use_bias=False, name="router")(x)
        probs = nn.softmax(logits, axis=-1)
        topw, topi = lax.top_k(probs, self.top_k)
        dispatch = jax.nn.one_hot(topi, self.num_experts, dtype=x.dtype)  # [T, K, E]
        out = jnp.zeros_like(x)
        for e in range(self.num_experts):
            w_e = jnp.sum(dispatch[:, :, e] * topw, axis=1)
            out = out + _LinenMlpExpert(self.hidden, x.shape[-1], name=f"expert_{e}")(x) * w_e[:, None]
        return out


def make_linen_dense_per_expert_onehot_column() -> Blind3Case:
    """Softmax top-2, no renorm; nn.Dense fc1/fc2 (biases) per expert, erf GELU; one-hot column weights."""
    T, D, F, E, K = 20, 24, 64, 5, 2
    x = normal(6101, (T, D))
    fc1 = [_init(6110 + e, (D, F), D) for e in range(E)]
    b1 = [normal(6120 + e, (F,), scale=0.1) for e in range(E)]
    fc2 = [_init(6130 + e, (F, D), F) for e in range(E)]
    b2 = [normal(6140 + e, (D,), scale=0.1) for e in range(E)]
    params = {"params": {"router": {"kernel": _init(6102, (D, E), D)}}}
    for e in range(E):
        params["params"][f"expert_{e}"] = {
            "fc1": {"kernel": fc1[e], "bias": b1[e]},
            "fc2": {"kernel": fc2[e], "bias": b2[e]},
        }
    module = _LinenLoopMoe(num_experts=E, top_k=K, hidden=F)

    def forward(params, x):
        return module.apply(params, x)

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(params["params"]["router"]["kernel"]), K),
        FfnRef(
            "gelu",
            up=_stack_np(fc1),
            down=_stack_np(fc2),
            up_b=_stack_np(b1),
            down_b=_stack_np(b2),
            gelu_approximate=False,
        ),
    )
    return _case(
        "linen_dense_per_expert_onehot_column",
        forward,
        (params, x),
        _expect(K, E, "gelu"),
        ref,
        "linen: nn.Dense submodules per expert (biases, erf GELU), w_e = sum(one_hot(ids)[:, :, e] * w); "
        "no renorm; E = 5",
    )


# ---------------------------------------------------------------------------------------------
# 3. Haiku: per-expert weight dicts under module-path names; top-3, the per-expert weight written
#    out one slot at a time
# ---------------------------------------------------------------------------------------------


def make_haiku_slotwise_where_sum_top3() -> Blind3Case:
    """Softmax top-3 renorm; per-expert dicts; w_e = where(ids[:, 0] == e, ..) + ... per slot; SiLU MLP."""
    T, D, F, E, K = 16, 32, 64, 8, 3
    x = normal(6201, (T, D))
    params = {"moe/~/router": {"w": _init(6202, (D, E), D)}}
    for e in range(E):
        params[f"moe/~/expert_{e}/~/linear_0"] = {"w": _init(6210 + e, (D, F), D)}
        params[f"moe/~/expert_{e}/~/linear_1"] = {"w": _init(6220 + e, (F, D), F)}

    def moe(params, x):
        probs = jax.nn.softmax(jnp.dot(x, params["moe/~/router"]["w"]), axis=-1)
        w, ids = lax.top_k(probs, K)
        w = w / w.sum(axis=-1, keepdims=True)
        out = jnp.zeros_like(x)
        for e in range(E):
            w_e = jnp.where(ids[:, 0] == e, w[:, 0], 0.0)
            w_e = w_e + jnp.where(ids[:, 1] == e, w[:, 1], 0.0)
            w_e = w_e + jnp.where(ids[:, 2] == e, w[:, 2], 0.0)
            h = jax.nn.silu(jnp.dot(x, params[f"moe/~/expert_{e}/~/linear_0"]["w"]))
            out = out + w_e[:, None] * jnp.dot(h, params[f"moe/~/expert_{e}/~/linear_1"]["w"])
        return out

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(params["moe/~/router"]["w"]), K, renorm=True),
        FfnRef(
            "silu",
            up=_stack_np([params[f"moe/~/expert_{e}/~/linear_0"]["w"] for e in range(E)]),
            down=_stack_np([params[f"moe/~/expert_{e}/~/linear_1"]["w"] for e in range(E)]),
        ),
    )
    return _case(
        "haiku_slotwise_where_sum_top3",
        moe,
        (params, x),
        _expect(K, E, "silu"),
        ref,
        "Haiku: per-expert weight dicts by module path, w_e written as three where(ids[:, j] == e, w[:, j], "
        "0) added one slot at a time; SiLU MLP",
    )


# ---------------------------------------------------------------------------------------------
# 4. Flax NNX: nnx.Linear per expert in an nnx.List; each expert only sees its routed tokens
#    (the others zeroed by a mask multiply); ungated shared expert
# ---------------------------------------------------------------------------------------------


def _nnx_linear(w) -> nnx.Linear:
    lin = nnx.Linear(w.shape[0], w.shape[1], use_bias=False, rngs=nnx.Rngs(0))
    lin.kernel[...] = w
    return lin


class _NnxSwiGLU(nnx.Module):
    def __init__(self, wg, wu, wd):
        self.gate_proj = _nnx_linear(wg)
        self.up_proj = _nnx_linear(wu)
        self.down_proj = _nnx_linear(wd)

    def __call__(self, x):
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class _NnxMaskedLoopMoe(nnx.Module):
    def __init__(self, router, experts, shared, top_k):
        self.router = _nnx_linear(router)
        self.experts = nnx.List(experts)
        self.shared_expert = shared
        self.top_k = top_k

    def __call__(self, x):
        w, ids = lax.top_k(nnx.softmax(self.router(x), axis=-1), self.top_k)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        out = jnp.zeros_like(x)
        for e, expert in enumerate(self.experts):
            routed = jnp.any(ids == e, axis=-1)  # [T]
            x_e = x * routed[:, None].astype(x.dtype)  # only the routed tokens reach the expert
            w_e = jnp.sum(w * (ids == e), axis=-1)
            out = out + expert(x_e) * w_e[:, None]
        return out + self.shared_expert(x)


def make_nnx_token_mask_loop_shared() -> Blind3Case:
    """Softmax top-2 renorm; nnx.List of SwiGLU experts each on x * routed_mask; plus a shared SwiGLU."""
    T, D, F, Fs, E, K = 24, 32, 32, 64, 8, 2
    x = normal(6301, (T, D))
    wg = [_init(6310 + e, (D, F), D) for e in range(E)]
    wu = [_init(6320 + e, (D, F), D) for e in range(E)]
    wd = [_init(6330 + e, (F, D), F) for e in range(E)]
    s = (_init(6341, (D, Fs), D), _init(6342, (D, Fs), D), _init(6343, (Fs, D), Fs))
    router = _init(6302, (D, E), D)
    model = _NnxMaskedLoopMoe(router, [_NnxSwiGLU(*w) for w in zip(wg, wu, wd)], _NnxSwiGLU(*s), K)
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(router), K, renorm=True),
        FfnRef("swiglu", gate=_stack_np(wg), up=_stack_np(wu), down=_stack_np(wd)),
        shared=_swiglu_ref(*s),
    )
    return _case(
        "nnx_token_mask_loop_shared",
        forward,
        (state, x),
        _expect(K, E, "swiglu", shared=True),
        ref,
        "NNX: nnx.Linear experts in nnx.List, expert(x * any(ids == e)[:, None]) * sum(w * (ids == e)); "
        "shared SwiGLU added",
    )


# ---------------------------------------------------------------------------------------------
# 5. Flax port of HF Llama4TextMoe: top-1 of the logits scattered into a -inf row, sigmoid, every
#    expert on every token scaled by its score (0 for the unchosen), expert outputs summed; shared
# ---------------------------------------------------------------------------------------------


def make_llama4_dense_scatter_sigmoid_on_input() -> Blind3Case:
    """Top-1 logit, sigmoid(full(-inf).at[ids].set(top)) scales x for all E experts; bmm; sum over E.

    The unchosen experts see x * sigmoid(-inf) = 0 and a bias-free SwiGLU maps 0 to 0, so the sum over
    all E experts equals the chosen expert's FFN(x * w) alone.
    """
    B, S, D, F, E, K = 2, 8, 32, 32, 8, 1
    x = normal(6401, (B, S, D))
    p = {
        "router": _init(6402, (E, D), D),  # nn.Linear(D, E, bias=False).weight
        "gate_up_proj": _init(6403, (E, D, 2 * F), D),
        "down_proj": _init(6404, (E, F, D), F),
        "shared_gate_proj": _init(6405, (F, D), D),  # torch [out, in]
        "shared_up_proj": _init(6406, (F, D), D),
        "shared_down_proj": _init(6407, (D, F), F),
    }

    def llama4_moe(p, hidden_states):
        h = hidden_states.reshape(-1, D)
        t = h.shape[0]
        router_logits = h @ p["router"].T
        top_value, top_index = lax.top_k(router_logits, K)
        rows = jnp.arange(t)[:, None]
        router_scores = jnp.full_like(router_logits, -jnp.inf).at[rows, top_index].set(top_value)
        router_scores = jax.nn.sigmoid(router_scores.T)  # [E, T]
        routed_in = jnp.tile(h, (E, 1)) * router_scores.reshape(-1, 1)
        gate_up = jnp.matmul(routed_in.reshape(E, t, D), p["gate_up_proj"])
        gate, up = jnp.split(gate_up, 2, axis=-1)
        routed_out = jnp.matmul(up * jax.nn.silu(gate), p["down_proj"]).reshape(-1, D)
        shared_act = jax.nn.silu(h @ p["shared_gate_proj"].T) * (h @ p["shared_up_proj"].T)
        shared = shared_act @ p["shared_down_proj"].T
        out = shared + routed_out.reshape(E, -1, D).sum(axis=0)
        return out.reshape(hidden_states.shape)

    gu = _np(p["gate_up_proj"])
    ref = Block4Ref(
        _np(x),
        Router4Ref(_t(p["router"], 1, 0), K, "sigmoid", "topk_then_score"),
        FfnRef("swiglu", gate=gu[..., :F], up=gu[..., F:], down=_np(p["down_proj"])),
        shared=FfnRef(
            "swiglu",
            gate=_t(p["shared_gate_proj"], 1, 0),
            up=_t(p["shared_up_proj"], 1, 0),
            down=_t(p["shared_down_proj"], 1, 0),
        ),
        weights_on_input=True,
    )
    return _case(
        "llama4_dense_scatter_sigmoid_on_input",
        llama4_moe,
        (p, x),
        _expect(K, E, "swiglu", shared=True, on_input=True),
        ref,
        "Llama-4 port: sigmoid of a -inf-filled scatter of the top-1 logit, tile(x, E) * scores before "
        "fused gate_up bmm, sum over E unweighted; shared",
    )


# ---------------------------------------------------------------------------------------------
# 6. research code, Llama-4 routing sorted: tokens scaled by sigmoid(top-1 logit), sorted by expert,
#    ragged_dot, scattered back unweighted
# ---------------------------------------------------------------------------------------------


def make_llama4_sorted_ragged_on_input() -> Blind3Case:
    """Top-1 logit, x * sigmoid(logit) sorted by expert, ragged_dot SwiGLU, .at[order].set back; E = 16."""
    T, D, F, E, K = 32, 32, 32, 16, 1
    x = normal(6501, (T, D))
    p = {
        "router": _init(6502, (D, E), D),
        "wg": _init(6503, (E, D, F), D),
        "wu": _init(6504, (E, D, F), D),
        "wd": _init(6505, (E, F, D), F),
    }

    def moe(p, x):
        top, idx = lax.top_k(x @ p["router"], 1)
        scaled = x * jax.nn.sigmoid(top)  # [T, D] * [T, 1]
        expert_of = idx[:, 0]
        order = jnp.argsort(expert_of)
        xs = scaled[order]
        sizes = jnp.bincount(expert_of, length=E)
        h = jax.nn.silu(lax.ragged_dot(xs, p["wg"], sizes)) * lax.ragged_dot(xs, p["wu"], sizes)
        ys = lax.ragged_dot(h, p["wd"], sizes)
        return jnp.zeros_like(x).at[order].set(ys)

    ref = Block4Ref(
        _np(x),
        Router4Ref(_np(p["router"]), K, "sigmoid", "topk_then_score"),
        _swiglu_ref(p["wg"], p["wu"], p["wd"]),
        weights_on_input=True,
    )
    return _case(
        "llama4_sorted_ragged_on_input",
        moe,
        (p, x),
        _expect(K, E, "swiglu", on_input=True),
        ref,
        "Llama-4 routing, sorted: x * sigmoid(top-1 logit) before the experts, argsort + ragged_dot, "
        "zeros.at[order].set(ys) with no weight",
    )


# ---------------------------------------------------------------------------------------------
# 7. Llama-4-style weights on the input with top-2, bf16 experts in a loop, f32 router
# ---------------------------------------------------------------------------------------------


def make_llama4_loop_top2_on_input_bf16() -> Blind3Case:
    """bf16: top-2 logits (f32), sigmoid each; loop: expert_e(bf16(x * s_e)) summed in f32 unweighted."""
    T, D, F, E, K = 16, 32, 64, 8, 2
    x = normal(6601, (T, D), BF16)
    router = _init(6602, (D, E), D)  # f32
    experts = [
        {
            "gate": _init(6610 + e, (D, F), D, BF16),
            "up": _init(6620 + e, (D, F), D, BF16),
            "down": _init(6630 + e, (F, D), F, BF16),
        }
        for e in range(E)
    ]

    def moe(router, experts, x):
        top_logits, ids = lax.top_k(x.astype(F32) @ router, K)
        s = jax.nn.sigmoid(top_logits)
        out = jnp.zeros(x.shape, F32)
        for e, ex in enumerate(experts):
            s_e = jnp.sum(jnp.where(ids == e, s, 0.0), axis=-1)
            x_e = (x.astype(F32) * s_e[:, None]).astype(BF16)
            y = (jax.nn.silu(x_e @ ex["gate"]) * (x_e @ ex["up"])) @ ex["down"]
            out = out + y.astype(F32)
        return out.astype(BF16)

    ref = Block4Ref(
        _np(x),
        Router4Ref(_np(router), K, "sigmoid", "topk_then_score"),
        FfnRef(
            "swiglu",
            gate=_stack_np([ex["gate"] for ex in experts]),
            up=_stack_np([ex["up"] for ex in experts]),
            down=_stack_np([ex["down"] for ex in experts]),
        ),
        weights_on_input=True,
    )
    return _case(
        "llama4_loop_top2_on_input_bf16",
        moe,
        (router, experts, x),
        _expect(K, E, "swiglu", on_input=True),
        ref,
        "bf16, weights on input: top-2 logits each through sigmoid, loop expert_e(x * s_e) over a list of "
        "weight dicts, outputs summed unweighted",
    )


# ---------------------------------------------------------------------------------------------
# 8. research code: top-2 as argmax, then argmax again with the first masked to -inf; softmax over
#    the two chosen logits; dense exact-GeGLU experts; returns the ids
# ---------------------------------------------------------------------------------------------


def make_argmax_twice_neg_inf_geglu() -> Blind3Case:
    """Top-2 by two argmaxes (first masked to -inf), softmax over the 2 logits; dense erf GeGLU; ids out."""
    T, D, F, E, K = 16, 32, 48, 8, 2
    x = normal(6701, (T, D))
    p = {
        "router": _init(6702, (D, E), D),
        "wg": _init(6703, (E, D, F), D),
        "wu": _init(6704, (E, D, F), D),
        "wd": _init(6705, (E, F, D), F),
    }

    def moe(p, x):
        logits = x @ p["router"]
        rows = jnp.arange(x.shape[0])
        first = jnp.argmax(logits, axis=-1)
        masked = jnp.where(jax.nn.one_hot(first, E) > 0, -jnp.inf, logits)
        second = jnp.argmax(masked, axis=-1)
        pair = jnp.stack([logits[rows, first], logits[rows, second]], axis=-1)
        w = jax.nn.softmax(pair, axis=-1)
        g = jnp.einsum("td,edf->etf", x, p["wg"])
        u = jnp.einsum("td,edf->etf", x, p["wu"])
        y = jnp.einsum("etf,efd->etd", jax.nn.gelu(g, approximate=False) * u, p["wd"])
        combine = jax.nn.one_hot(first, E) * w[:, :1] + jax.nn.one_hot(second, E) * w[:, 1:]
        return jnp.einsum("etd,te->td", y, combine), jnp.stack([first, second], axis=-1)

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["router"]), K, order="topk_then_score"),
        FfnRef("geglu", gate=_np(p["wg"]), up=_np(p["wu"]), down=_np(p["wd"]), gelu_approximate=False),
        outputs=("ids",),
    )
    return _case(
        "argmax_twice_neg_inf_geglu",
        moe,
        (p, x),
        _expect(K, E, "geglu"),
        ref,
        "no top_k: argmax, argmax of where(one_hot(first), -inf, logits), softmax over the 2 chosen logits; "
        "dense erf GeGLU",
    )


# ---------------------------------------------------------------------------------------------
# 9. OLMoE-ish: top-3 by the reversed ascending argsort of the probabilities, weights by fancy
#    indexing; experts gathered per token with vmap over tokens; combine jnp.sum(axis=-2)
# ---------------------------------------------------------------------------------------------


def make_argsort_reversed_fancy_vmap_tokens() -> Blind3Case:
    """Softmax, ids = argsort(p)[:, ::-1][:, :3], w = p[rows, ids] renorm; vmap over tokens of W[ids]."""
    T, D, F, E, K = 16, 32, 32, 12, 3
    x = normal(6801, (T, D))
    p = {
        "router": _init(6802, (D, E), D),
        "wg": _init(6803, (E, D, F), D),
        "wu": _init(6804, (E, D, F), D),
        "wd": _init(6805, (E, F, D), F),
    }

    def one_token(p, xt, ids_t):  # xt [D], ids_t [K]
        g = jnp.einsum("d,kdf->kf", xt, p["wg"][ids_t])
        u = jnp.einsum("d,kdf->kf", xt, p["wu"][ids_t])
        return jnp.einsum("kf,kfd->kd", jax.nn.silu(g) * u, p["wd"][ids_t])

    def moe(p, x):
        probs = jax.nn.softmax(x @ p["router"], axis=-1)
        ids = jnp.argsort(probs, axis=-1)[:, ::-1][:, :K]
        w = probs[jnp.arange(x.shape[0])[:, None], ids]
        w = w / w.sum(axis=-1, keepdims=True)
        y = jax.vmap(one_token, in_axes=(None, 0, 0))(p, x, ids)  # [T, K, D]
        return jnp.sum(y * w[..., None], axis=-2), ids

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["router"]), K, renorm=True),
        _swiglu_ref(p["wg"], p["wu"], p["wd"]),
        outputs=("ids",),
    )
    return _case(
        "argsort_reversed_fancy_vmap_tokens",
        moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "no top_k: argsort(p)[:, ::-1][:, :3], p[arange[:, None], ids] renorm; vmap over tokens of "
        "W[ids] experts; sum(axis=-2); E = 12",
    )


# ---------------------------------------------------------------------------------------------
# 10. Flax port of HF PhiMoE: SparseMixer top-2 (inference path, no jitter), torch-layout
#     per-expert arrays, loop with the [E, K, T] expert mask
# ---------------------------------------------------------------------------------------------

PHIMOE_JITTER_EPS = 0.01


def _sparsemixer(scores, eps: float):
    """PhiMoE's top-2 at inference: each slot's weight is a softmax over the experts near that slot's max."""
    rows = jnp.arange(scores.shape[0])
    threshold = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    first = jnp.argmax(scores, axis=-1)[:, None]
    factor = jnp.maximum(jnp.abs(scores), threshold)
    far = lax.stop_gradient((threshold - scores) / factor > 2 * eps)
    gates = jax.nn.softmax(jnp.where(far, -jnp.inf, scores), axis=-1)
    mult = jnp.take_along_axis(gates, first, axis=-1)

    masked_scores = scores.at[rows, first[:, 0]].set(-jnp.inf)
    threshold = lax.stop_gradient(jnp.max(masked_scores, axis=-1, keepdims=True))
    second = jnp.argmax(masked_scores, axis=-1)[:, None]
    factor = jnp.maximum(jnp.abs(scores), threshold)
    far = lax.stop_gradient((threshold - scores) / factor > 2 * eps)
    gates = jax.nn.softmax(jnp.where(far, -jnp.inf, masked_scores), axis=-1)
    mult_2 = jnp.take_along_axis(gates, second, axis=-1)
    return jnp.concatenate([mult, mult_2], axis=-1), jnp.concatenate([first, second], axis=-1)


def make_phimoe_sparsemixer_loop() -> Blind3Case:
    """SparseMixer top-2 of the logits (eps 0.01); torch [F, D] / [D, F] per-expert arrays; mask loop."""
    T, D, F, E, K = 32, 32, 32, 16, 2
    x = normal(6901, (T, D))
    p = {
        "gate": _init(6902, (E, D), D),  # nn.Linear(D, E, bias=False).weight
        "experts": [
            {
                "w1": _init(6910 + e, (F, D), D),
                "w3": _init(6930 + e, (F, D), D),
                "w2": _init(6950 + e, (D, F), F),
            }
            for e in range(E)
        ],
    }

    def phimoe_block(p, hidden_states):
        router_logits = hidden_states @ p["gate"].T
        routing_weights, selected = _sparsemixer(router_logits, PHIMOE_JITTER_EPS)
        expert_mask = jax.nn.one_hot(selected, E, dtype=hidden_states.dtype).transpose(2, 1, 0)  # [E, K, T]
        final = jnp.zeros_like(hidden_states)
        for e, ex in enumerate(p["experts"]):
            w_e = jnp.sum(expert_mask[e] * routing_weights.T, axis=0)  # [T]
            cur = jax.nn.silu(hidden_states @ ex["w1"].T) * (hidden_states @ ex["w3"].T)
            final = final + (cur @ ex["w2"].T) * w_e[:, None]
        return final, selected

    ex = p["experts"]
    ref = Block4Ref(
        _np(x),
        Router4Ref(_t(p["gate"], 1, 0), K, order="sparsemixer", jitter_eps=PHIMOE_JITTER_EPS),
        FfnRef(
            "swiglu",
            gate=_stack_np([d["w1"] for d in ex], 1, 0),
            up=_stack_np([d["w3"] for d in ex], 1, 0),
            down=_stack_np([d["w2"] for d in ex], 1, 0),
        ),
        outputs=("ids",),
    )
    return _case(
        "phimoe_sparsemixer_loop",
        phimoe_block,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "PhiMoE: SparseMixer top-2 (argmax, relative-threshold masked softmax, twice), torch-layout "
        "per-expert arrays, loop over one_hot(ids).transpose(2, 1, 0)[e]",
    )


# ---------------------------------------------------------------------------------------------
# 11. torch-layout dense experts: router x @ W.T, softmax computed again for the gather by fancy
#     indexing, [T, E] gates by .at[].set, einsums with unusual letters
# ---------------------------------------------------------------------------------------------


def make_torch_dense_scatter_gates_letters() -> Blind3Case:
    """Softmax top-2 renorm (scores recomputed, fancy-indexed); dense ReLU x[None] @ W.swapaxes; 'qnc,nq->nc'.

    A bias-free ReLU MLP is positively homogeneous (FFN(x * w) == w * FFN(x) for w >= 0), so this block
    also equals its weights-on-input reading; ``expect`` records the spelling (weights on the output).
    """
    B, S, D, F, E, K = 2, 10, 32, 64, 8, 2
    x = normal(7001, (B, S, D))
    p = {
        "router": _init(7002, (E, D), D),  # [E, D]
        "w_in": _init(7003, (E, F, D), D),  # torch [out, in] per expert
        "w_out": _init(7004, (E, D, F), F),
    }

    def moe(p, x):
        h = x.reshape(-1, D)
        n = h.shape[0]
        _, ids = lax.top_k(jax.nn.softmax(h @ p["router"].T, axis=-1), K)
        w = jax.nn.softmax(h @ p["router"].T, axis=-1)[jnp.arange(n)[:, None], ids]
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        gates = jnp.zeros((n, E), h.dtype).at[jnp.arange(n)[:, None], ids].set(w)
        a = jax.nn.relu(h[None] @ jnp.swapaxes(p["w_in"], 1, 2))  # [E, N, F]
        y = jnp.einsum("qnf,qcf->qnc", a, p["w_out"])
        return jnp.einsum("qnc,nq->nc", y, gates).reshape(x.shape)

    ref = Block4Ref(
        _np(x),
        RouterRef(_t(p["router"], 1, 0), K, renorm=True),
        FfnRef("relu", up=_t(p["w_in"], 0, 2, 1), down=_t(p["w_out"], 0, 2, 1)),
    )
    return _case(
        "torch_dense_scatter_gates_letters",
        moe,
        (p, x),
        _expect(K, E, "relu"),
        ref,
        "torch layouts: x @ W.T router, softmax recomputed and fancy-indexed, zeros.at[rows, ids].set(w) "
        "gates, einsums qnf,qcf->qnc / qnc,nq->nc",
    )


# ---------------------------------------------------------------------------------------------
# 12. gathered GeGLU experts whose tanh GELU is written through a sigmoid, shared GeGLU with
#     jax.nn.gelu(approximate=True); top-k taken on the logits, weights from the sigmoid
# ---------------------------------------------------------------------------------------------

_TWO_SQRT_2_OVER_PI = 2.0 * float(np.sqrt(2.0 / np.pi))


def _gelu_via_sigmoid(a):
    """The tanh GELU rewritten: 0.5 * (1 + tanh(z)) == sigmoid(2 z)."""
    return a * jax.nn.sigmoid(_TWO_SQRT_2_OVER_PI * (a + 0.044715 * a * a * a))


def make_sigmoid_gelu_gather_tkd_shared() -> Blind3Case:
    """Sigmoid top-2 renorm (top_k on logits); gathered GeGLU, GELU via sigmoid; einsum 'tkd->td'; shared."""
    T, D, F, Fs, E, K = 16, 32, 32, 48, 8, 2
    x = normal(7101, (T, D))
    p = {
        "router": _init(7102, (D, E), D),
        "wg": _init(7103, (E, D, F), D),
        "wu": _init(7104, (E, D, F), D),
        "wd": _init(7105, (E, F, D), F),
        "sg": _init(7106, (D, Fs), D),
        "su": _init(7107, (D, Fs), D),
        "sd": _init(7108, (Fs, D), Fs),
    }

    def moe(p, x):
        logits = x @ p["router"]
        _, ids = lax.top_k(logits, K)
        w = jnp.take_along_axis(jax.nn.sigmoid(logits), ids, axis=-1)
        w = w / w.sum(-1, keepdims=True)
        g = jnp.einsum("td,tkdf->tkf", x, p["wg"][ids])
        u = jnp.einsum("td,tkdf->tkf", x, p["wu"][ids])
        y = jnp.einsum("tkf,tkfd->tkd", _gelu_via_sigmoid(g) * u, p["wd"][ids])
        routed = jnp.einsum("tkd->td", y * w[..., None])
        shared = (jax.nn.gelu(x @ p["sg"], approximate=True) * (x @ p["su"])) @ p["sd"]
        return routed + shared

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["router"]), K, "sigmoid", renorm=True),
        FfnRef("geglu", gate=_np(p["wg"]), up=_np(p["wu"]), down=_np(p["wd"])),
        shared=FfnRef("geglu", gate=_np(p["sg"]), up=_np(p["su"]), down=_np(p["sd"])),
    )
    return _case(
        "sigmoid_gelu_gather_tkd_shared",
        moe,
        (p, x),
        _expect(K, E, "geglu", shared=True),
        ref,
        "top_k on the logits, weights sigmoid gathered after; tanh GELU as a*sigmoid(2z) in routed, "
        "jax.nn.gelu(approximate=True) in shared; einsum('tkd->td')",
    )


# ---------------------------------------------------------------------------------------------
# 13. bf16 tokens, f32 router, top-1 without renormalisation; per-token gathered bf16 experts with
#     f32 accumulation, expert outputs cast to bf16 and back before the weighting
# ---------------------------------------------------------------------------------------------


def make_bf16_top1_no_renorm_roundtrip() -> Blind3Case:
    """bf16: f32 softmax top-1 (weight = max prob); gathered SwiGLU, f32 accumulation; bf16 round trips."""
    B, S, D, F, E, K = 2, 8, 32, 64, 4, 1
    x = normal(7201, (B, S, D), BF16)
    p = {
        "router": _init(7202, (D, E), D),  # f32
        "wg": _init(7203, (E, D, F), D, BF16),
        "wu": _init(7204, (E, D, F), D, BF16),
        "wd": _init(7205, (E, F, D), F, BF16),
    }

    def moe(p, x):
        h = x.reshape(-1, D)
        probs = jax.nn.softmax(h.astype(F32) @ p["router"], axis=-1)
        w, idx = lax.top_k(probs, 1)
        e = idx[:, 0]
        g = jnp.einsum("td,tdf->tf", h, p["wg"][e], preferred_element_type=F32)
        u = jnp.einsum("td,tdf->tf", h, p["wu"][e], preferred_element_type=F32)
        a = (jax.nn.silu(g) * u).astype(BF16)
        y = jnp.einsum("tf,tfd->td", a, p["wd"][e], preferred_element_type=F32)
        y = y.astype(BF16).astype(F32)
        return (y * w).astype(BF16).reshape(x.shape)

    ref = Block4Ref(_np(x), RouterRef(_np(p["router"]), K), _swiglu_ref(p["wg"], p["wu"], p["wd"]))
    return _case(
        "bf16_top1_no_renorm_roundtrip",
        moe,
        (p, x),
        _expect(K, E, "swiglu"),
        ref,
        "bf16: top-1 prob as the weight (no renorm), W[idx] gathered, preferred_element_type f32, "
        "y.astype(bf16).astype(f32) before * w",
    )


# ---------------------------------------------------------------------------------------------
# 14. keras-jax style: argmax for the expert, max of the probabilities for the weight (the score
#     read twice), dense ReLU experts with biases, combine mask by arange == idx
# ---------------------------------------------------------------------------------------------


def make_keras_argmax_max_top1_dense_bias() -> Blind3Case:
    """Softmax top-1 by argmax + max (no top_k, no renorm); dense ReLU MLP, biases; where(arange == idx)."""
    T, D, F, E, K = 24, 16, 48, 4, 1
    x = normal(7301, (T, D))
    p = {
        "router_kernel": _init(7302, (D, E), D),
        "expert_kernel_in": _init(7303, (E, D, F), D),
        "expert_bias_in": normal(7304, (E, F), scale=0.1),
        "expert_kernel_out": _init(7305, (E, F, D), F),
        "expert_bias_out": normal(7306, (E, D), scale=0.1),
    }

    def call(p, inputs):
        probs = jax.nn.softmax(jnp.matmul(inputs, p["router_kernel"]), axis=-1)
        expert_index = jnp.argmax(probs, axis=-1)
        expert_gate = jnp.max(probs, axis=-1)
        hidden = jnp.einsum("td,edf->tef", inputs, p["expert_kernel_in"]) + p["expert_bias_in"]
        outs = jnp.einsum("tef,efd->ted", jax.nn.relu(hidden), p["expert_kernel_out"]) + p["expert_bias_out"]
        mask = jnp.arange(E)[None, :] == expert_index[:, None]
        combine = jnp.where(mask, expert_gate[:, None], 0.0)
        return jnp.einsum("ted,te->td", outs, combine)

    ref = Block4Ref(
        _np(x),
        RouterRef(_np(p["router_kernel"]), K),
        FfnRef(
            "relu",
            up=_np(p["expert_kernel_in"]),
            down=_np(p["expert_kernel_out"]),
            up_b=_np(p["expert_bias_in"]),
            down_b=_np(p["expert_bias_out"]),
        ),
    )
    return _case(
        "keras_argmax_max_top1_dense_bias",
        call,
        (p, x),
        _expect(K, E, "relu"),
        ref,
        "keras-jax: no top_k, argmax(probs) for the id and max(probs) for the weight; dense ReLU MLP with "
        "biases broadcast over [T, E, *]; where(arange == idx) combine",
    )


BLIND4_MOE_BLOCKS = [
    make_eqx_expert_modules_torch_linear_where,
    make_linen_dense_per_expert_onehot_column,
    make_haiku_slotwise_where_sum_top3,
    make_nnx_token_mask_loop_shared,
    make_llama4_dense_scatter_sigmoid_on_input,
    make_llama4_sorted_ragged_on_input,
    make_llama4_loop_top2_on_input_bf16,
    make_argmax_twice_neg_inf_geglu,
    make_argsort_reversed_fancy_vmap_tokens,
    make_phimoe_sparsemixer_loop,
    make_torch_dense_scatter_gates_letters,
    make_sigmoid_gelu_gather_tkd_shared,
    make_bf16_top1_no_renorm_roundtrip,
    make_keras_argmax_max_top1_dense_bias,
]
