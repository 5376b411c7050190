"""The fused `moe_ffn` op: routed expert FFNs and the weighted combine of a Mixture-of-Experts block.

Given tokens x [T, D] and the router's outputs (weights [T, k], expert ids int32 [T, k]),
`out[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])`, with GShard/Switch token dropping when
params.capacity is set, or Llama4's `out[t] = sum_j FFN_{ids[t, j]}(weights[t, j] * x[t])` when
params.weights_on_input (see `MoeParams` for the exact semantics). The shared expert is not part of
the op. `moe_ffn` is a `jax.custom_vjp`: the forward runs the chosen implementation; the backward
is the routed backward of `xla.backward` for impl="xla", the kernels' routed backward of
`grouped.backward` for impl="pallas_tpu" / "pallas_gpu" (grouped matmuls `gmm` for dx, transposed
ones `tgmm` for the expert weights), the routed backward of `xla.backward` for impl="dense_gather"
too (`dense_gather.forward`: every expert on every token, each assignment's output gathered), and the
VJP of the forward for impl="reference" (the pure-jnp `reference.moe_ffn_reference`, which defines the
op), impl="dense" (`dense.dense_ffn`) and impl="slots" (`slots.slots_ffn`, capacity sites).
Gradients flow to x, weights and every expert weight and bias; ids carry none.

Expert weights come stacked on a leading expert axis, or as `PerExpert`: E separate arrays of one
matrix, for models that keep each expert as its own module. impl="xla" reads those where they are
(stacking them would copy every expert's weights on every call), and so do "dense_gather" and
"reference"; "dense" and the Pallas kernels read one stacked array, so they refuse them, and their
selection rows decline a site that has them.

Example, Qwen3-MoE-style SwiGLU experts (top-2 of 8)::

    import jax, jax.numpy as jnp
    from moefuse.kernels.moe import MoeParams, moe_ffn

    T, D, F, E = 16, 64, 128, 8
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, D))
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (T, E))), 2)
    w_gate, w_up = (jax.random.normal(kk, (E, D, F)) * D**-0.5 for kk in keys[2:4])
    w_down = jax.random.normal(keys[4], (E, F, D)) * F**-0.5
    p = MoeParams(num_experts=E, k=2, activation="swiglu")
    out = moe_ffn(x, weights, ids, (w_gate, w_up), w_down, p)   # [16, 64] float32
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from moefuse import select

from . import dense, dense_gather, grouped, pallas_gpu, pallas_tpu, slots, xla
from .grouped import Tiles
from .params import GLU_ACTIVATIONS, MoeParams
from .reference import (
    ExpertArray,
    ExpertWeights,
    PerExpert,
    expert_weights,
    has_per_expert,
    moe_ffn_reference,
    routed_ffn_reference,
    validate_inputs,
)
from .xla import schedule

__all__ = ["IMPLS", "MoeParams", "PerExpert", "Tiles", "moe_ffn", "moe_ffn_reference", "schedule"]

# The Plan parameter a pattern sets (to "per_expert") when the fused op takes each expert's weights as
# separate arrays (`PerExpert`); the selection rows of kernels that read one stacked array decline it.
EXPERT_WEIGHTS_PARAM = "expert_weights"
STACKED_ONLY = "expert weights are E separate arrays; this kernel reads one stacked array"

@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Static options of a Pallas implementation: interpret mode, and tiles (None: the backend's default)."""

    interpret: bool = False
    tiles: Tiles | None = None


@dataclasses.dataclass(frozen=True)
class Impl:
    """forward(x, weights, ids, ew, params, options) -> (out, residuals);
    backward(residuals, g, params, options) -> (dx, dweights, d expert weights)."""

    forward: Callable
    backward: Callable
    per_expert: bool = False  # reads expert weights given as `PerExpert` arrays (else: stacked ones only)


def _autodiff(ffn: Callable, per_expert: bool = False) -> Impl:
    """An implementation whose backward is the VJP of its forward, ffn(x, weights, ids, ew, params)."""

    def forward(x, weights, ids, ew, params, options):
        return ffn(x, weights, ids, ew, params), (x, weights, ids, ew)

    def backward(residuals, g, params, options):
        x, weights, ids, ew = residuals
        _, pullback = jax.vjp(lambda x_, w_, ew_: ffn(x_, w_, ids, ew_, params), x, weights, ew)
        return pullback(g)

    return Impl(forward, backward, per_expert)


def _pallas(backend: grouped.Backend) -> Impl:
    return Impl(
        forward=lambda x, weights, ids, ew, params, o: grouped.forward(x, weights, ids, ew, params, backend,
                                                                       o.tiles, o.interpret),
        backward=lambda res, g, params, o: grouped.backward(res, g, params, backend, o.tiles, o.interpret),
    )


IMPLS: dict[str, Impl] = {
    "reference": _autodiff(routed_ffn_reference, per_expert=True),
    "xla": Impl(lambda x, weights, ids, ew, params, o: xla.forward(x, weights, ids, ew, params),
                lambda res, g, params, o: xla.backward(res, g, params), per_expert=True),
    "dense_gather": Impl(lambda x, weights, ids, ew, params, o: dense_gather.forward(x, weights, ids, ew,
                                                                                      params),
                         lambda res, g, params, o: xla.backward(res, g, params), per_expert=True),
    "dense": _autodiff(dense.dense_ffn),
    "slots": _autodiff(slots.slots_ffn),
    "pallas_tpu": _pallas(pallas_tpu.BACKEND),
    "pallas_gpu": _pallas(pallas_gpu.BACKEND),
}


@functools.cache
def _traced(params: MoeParams, impl: str, options: KernelOptions) -> Impl:
    """The implementation's forward and backward under one `jax.jit` per configuration, so that the
    layers of a model that share a configuration and shapes are traced once (jit's trace cache), not
    once per layer: tracing the sorted schedule is most of what planning a model costs."""
    chosen = IMPLS[impl]
    return Impl(
        forward=jax.jit(lambda x, weights, ids, ew: chosen.forward(x, weights, ids, ew, params, options)),
        backward=jax.jit(lambda residuals, g: chosen.backward(residuals, g, params, options)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _moe(params: MoeParams, impl: str, options: KernelOptions, x, weights, ids, ew: ExpertWeights):
    return _traced(params, impl, options).forward(x, weights, ids, ew)[0]


def _moe_fwd(params: MoeParams, impl: str, options: KernelOptions, x, weights, ids, ew: ExpertWeights):
    return _traced(params, impl, options).forward(x, weights, ids, ew)


def _moe_bwd(params: MoeParams, impl: str, options: KernelOptions, residuals, g):
    dx, dweights, dew = _traced(params, impl, options).backward(residuals, g)
    return dx, dweights, None, dew


_moe.defvjp(_moe_fwd, _moe_bwd)


def _tiles(backend: grouped.Backend) -> Callable:
    def tiles(req: select.Request, target: select.Target) -> dict[str, int]:
        """backend default_tiles for the shape (rows per tile from the mean rows per expert)"""
        p = req.params
        x, w_down = req.inputs[0], req.inputs[3 + (2 if p["activation"] in GLU_ACTIVATIONS
                                                    and not p["fused_gate_up"] else 1)]
        t, d, e = math.prod(x.shape[:-1]), x.shape[-1], p["num_experts"]
        f = math.prod(w_down.shape) // (e * d)
        dtype = p["compute_dtype"] or x.dtype
        chosen = backend.default_tiles(t, p["k"], e, d, f, dtype, p["activation"] in GLU_ACTIVATIONS)
        return {k: v for k, v in dataclasses.asdict(chosen).items() if v is not None}

    tiles.__doc__ = tiles.__doc__.replace("backend", backend.ffn.__module__.rsplit(".", 1)[-1])
    return tiles


# A dense original against the fused op on CPU (2 cores, 2026-12-03, SwiGLU/GELU, k=2), below
# T*E*D*F = 2**20: with the sorted schedule 0.85-0.90x (jax 0.10.2) and 0.81-0.95x on the five tiny
# dense real-model paths (jax 0.12.0.1); with the dense one 1.01-1.06x and 0.96-1.13x. From 2**20 the
# sorted one wins (0.95-1.9x at 1M, 2.4-2.8x at 4-8M). So below 2**20 a dense original stays dense.
DENSE_WORK = 2**20


def _ffn_dims(req: select.Request) -> tuple[int, int, int]:
    """(tokens, E * D * F) of a site: its token count and the size of its expert weights."""
    p = req.params
    x, w_down = req.inputs[0], req.inputs[3 + (2 if p["activation"] in GLU_ACTIVATIONS
                                                and not p["fused_gate_up"] else 1)]
    return math.prod(x.shape[:-1]), math.prod(w_down.shape)


def _small_dense(req: select.Request) -> bool:
    """a site whose original runs every expert on every token, at a size where that is as fast"""
    p = req.params
    if p.get("dispatch") != "dense" or p.get("capacity") is not None:
        return False
    t, edf = _ffn_dims(req)
    return t * edf < DENSE_WORK


# Capacity sites on CPU (2 cores shared with other jobs, 2026-12-07, jax 0.10.2;
# benchmarks/results/capacity_cpu.json): the slots schedule ran at 1.08-1.16x of the sorted one with at
# most one capacity slot per assignment (E*G*C <= T*k), at 1.3-2.6x at the tiny size (E*G*C*D*F =
# 2^16-2^19, where the sort's fixed cost dominates) whatever the slots, and at 0.39-0.88x with 2-4 slots
# per assignment at the larger sizes. MaxText's dense capacity path through moefuse.jit (jax 0.12.0.1,
# capacity factor 0.5) against its original: slots 1.02-1.43x from tiny to realistic sizes, where the
# sorted schedule gave 0.82-1.39x.
SLOTS_WORK = 2**20


def _slots_pay(req: select.Request) -> bool:
    """a site that drops tokens, with at most one capacity slot per assignment or at a size where the
    sorted schedule's fixed cost dominates"""
    p = req.params
    if p.get("capacity") is None:
        return False
    t, edf = _ffn_dims(req)
    slots = p["num_experts"] * p["capacity"] * p.get("capacity_groups", 1)
    return slots <= t * p["k"] or slots * edf // p["num_experts"] < SLOTS_WORK


# A routed original (sort, gathered weights, a loop over experts) against the fused op on CPU (2 cores,
# 2026-12-07, jax 0.10.2, SwiGLU k=2; the kernel alone in benchmarks/moe_cpu.py's manner): running every
# expert on every token and gathering each assignment's row took 0.06-0.16 ms from T*E*D*F = 2**17 to
# 2**20, the sorted schedule 0.11-0.20 ms and a sort + ragged_dot original 0.08-0.28 ms; from 2**21 the
# sorted schedule wins (0.22 against 0.25 ms, 0.31 against 0.54 ms at 2**23). End to end at the tiny
# real-model size (benchmarks/real_models.py, jax 0.12.0.1): five routed paths ran at 0.71-0.87x of
# their original with the sorted schedule (2026-12-07); the thirteen with dense_gather at 1.01-3.34x
# (2026-12-08, its expert work ordered after the router: see dense_gather's docstring; median, the A/A
# control 0.91-1.05x).
DENSE_GATHER_WORK = 2**21


def _small_routed(req: select.Request) -> bool:
    """a site whose original routes tokens to their experts, small enough that running every expert on
    every token costs less than sorting"""
    p = req.params
    if p.get("dispatch") == "dense" and not p.get("weights_on_input"):
        return False  # the dense row's (a dense original with weights on the input lands here)
    t, edf = _ffn_dims(req)
    return t * edf < DENSE_GATHER_WORK


def _one_rounding(req: select.Request, target: select.Target) -> str | None:
    """Kernels that round only the FFN output cannot give each projection its own dtype."""
    pdt = req.params.get("projection_dtype")
    return None if pdt is None else f"rounds each FFN once, not each projection to projection_dtype={pdt}"


def _stacked_only(req: select.Request, target: select.Target) -> str | None:
    """Kernels that read one stacked array per expert matrix cannot take per-expert arrays (stacking
    them would copy every expert's weights on every call)."""
    return STACKED_ONLY if req.params.get(EXPERT_WEIGHTS_PARAM) == "per_expert" else None


def _stacked_one_rounding(req: select.Request, target: select.Target) -> str | None:
    return _stacked_only(req, target) or _one_rounding(req, target)


def _dense_fits(req: select.Request, target: select.Target) -> str | None:
    """The dense schedule runs every expert on the tokens as they are and weights the outputs."""
    if req.params.get("weights_on_input"):
        return ("runs every expert on the tokens as they are; weights_on_input scales each routed row "
                "first (a dense run of the scaled rows would also need FFN_e(0) = 0 for the experts "
                "not chosen)")
    return _stacked_one_rounding(req, target)


def _example(p: MoeParams, kernel: select.Kernel, t: int, d: int, f: int, dtype) -> tuple[Callable, tuple]:
    """fn(x, weights, ids, *expert weights and biases) -> ((sum of the output, output), its gradients
    with respect to every input but ids), and fn's arguments as ShapeDtypeStructs."""
    e = p.num_experts
    n_in = 2 if p.is_glu and not p.fused_gate_up else 1
    cols = 2 * f if p.fused_gate_up else f
    biases = [(e, cols)] * n_in + [(e, d)] if p.has_expert_bias else []
    shapes = [(t, d), (t, p.k), (t, p.k), *[(e, d, cols)] * n_in, (e, f, d), *biases]
    args = tuple(jax.ShapeDtypeStruct(s, jnp.int32 if i == 2 else dtype) for i, s in enumerate(shapes))

    def one_or_pair(v: tuple) -> Any:
        return v[0] if len(v) == 1 else v

    def loss(x, weights, ids, *ws):
        b = ws[n_in + 1:]
        out = moe_ffn(x, weights, ids, one_or_pair(ws[:n_in]), ws[n_in], p, impl=kernel,
                      b_in=one_or_pair(b[:n_in]) if b else None, b_down=b[-1] if b else None)
        return jnp.sum(out.astype(jnp.float32)), out

    def fn(*a):
        return jax.value_and_grad(loss, argnums=(0, 1, *range(3, len(a))), has_aux=True)(*a)

    return fn, args


def _examples(impl: str, backend: grouped.Backend) -> Callable:
    """Configurations of the kernel `impl` the deviceless compile check builds (tests/compile): each is
    the forward and the backward (the output and the gradients of its sum: the FFN kernel, gmm and
    tgmm) at the backend's default tiles for the shape."""

    def examples() -> list[tuple[str, Callable, tuple]]:
        mixtral = MoeParams(num_experts=8, k=2)
        ling = MoeParams(num_experts=256, k=8)
        # GPT-OSS-like: fused interleaved gate/up with biases; D, F > 512 with no multiple of 128 dividing
        # them, so the TPU kernels run partial last blocks with masked tails
        gpt_oss = MoeParams(num_experts=32, k=4, activation="swiglu_oai", fused_gate_up=True,
                            gate_up_layout="interleaved", has_expert_bias=True)
        out = []
        for name, p, t, d, f, dt in (
            ("mixtral_f32_T256", mixtral, 256, 512, 1024, jnp.float32),
            ("mixtral_bf16_T250", mixtral, 250, 512, 1024, jnp.bfloat16),
            ("ling_bf16_T203", ling, 203, 512, 256, jnp.bfloat16),
            ("gptoss_f32_T37", gpt_oss, 37, 576, 720, jnp.float32),
        ):
            chosen = backend.default_tiles(t, p.k, p.num_experts, d, f, dt, p.is_glu)
            kernel = select.Kernel(impl, tuple((n, v) for n, v in dataclasses.asdict(chosen).items()
                                               if v is not None))
            out.append((name, *_example(p, kernel, t, d, f, dt)))
        return out

    return examples


select.register_impls("moe", tuple(IMPLS))
select.register(
    select.KernelRow("moe", "tpu", "pallas_tpu", dtypes=("float32", "bfloat16"),
                     tiles=_tiles(pallas_tpu.BACKEND), fits=_stacked_one_rounding,
                     note="Pallas TPU (Mosaic): one fused expert-FFN kernel over expert-sorted row tiles; "
                          "backward gmm / tgmm kernels",
                     examples=_examples("pallas_tpu", pallas_tpu.BACKEND)),
    select.KernelRow("moe", "tpu", "xla", note="sorted block schedule (XLA)"),
    select.KernelRow("moe", "gpu", "pallas_gpu", dtypes=("float32", "bfloat16"),
                     tiles=_tiles(pallas_gpu.BACKEND), fits=_stacked_one_rounding,
                     note="Pallas GPU (Triton): grouped matmuls over expert-sorted row tiles, activation "
                          "fused; XLA combine",
                     examples=_examples("pallas_gpu", pallas_gpu.BACKEND)),
    select.KernelRow("moe", "gpu", "xla", note="sorted block schedule (XLA)"),
    select.KernelRow("moe", "cpu", "dense", shape=f"dispatch dense, T*E*D*F < {DENSE_WORK:,}",
                     when=_small_dense, fits=_dense_fits,
                     note="every expert on every token (XLA), as the original computes it: at this size "
                          "a few large dots beat sorting"),
    select.KernelRow("moe", "cpu", "slots",
                     shape=f"capacity, E*G*C <= T*k or E*G*C*D*F < {SLOTS_WORK:,}", when=_slots_pay,
                     fits=_stacked_only,
                     note="each expert on its capacity slots of every token group (XLA), as capacity "
                          "originals compute: at this size that beats sorting"),
    select.KernelRow("moe", "cpu", "dense_gather", shape=f"T*E*D*F < {DENSE_GATHER_WORK:,}",
                     when=_small_routed,
                     note="every expert on every token, each assignment's output gathered (XLA; routed "
                          "backward): at this size cheaper than sorting"),
    select.KernelRow("moe", "cpu", "xla", note="sorted block schedule (XLA)"),
)


def moe_ffn(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    w_in: ExpertArray | tuple[ExpertArray, ExpertArray],
    w_down: ExpertArray,
    params: MoeParams,
    *,
    b_in: ExpertArray | tuple[ExpertArray, ExpertArray] | None = None,
    b_down: ExpertArray | None = None,
    impl: str | select.Kernel = "xla",
    interpret: bool = False,
    tiles: Tiles | None = None,
) -> jax.Array:
    """Routed expert FFNs combined over k: out [T, D] in params.out_dtype (default x's dtype).

    x [T, D]; weights [T, k] (floating); ids [T, k] int32. w_in is [E, D, F] for plain MLPs
    (gelu/relu/silu); for GLU activations the pair (w_gate, w_up) of [E, D, F], or one [E, D, 2F]
    array when params.fused_gate_up (layout params.gate_up_layout). w_down is [E, F, D].
    b_in ([E, F], a pair, or [E, 2F], following w_in) and b_down [E, D] are required iff
    params.has_expert_bias. Any of these arrays may be a `PerExpert` instead: the E arrays of a model
    that keeps each expert as its own module, each without the expert axis (w_down as E arrays [F, D],
    a GLU pair as two PerExperts of [D, F] ...), taken as they are, never stacked by impl="xla" (which
    then skips its capacity pass), "dense_gather" or "reference"; "dense" and the Pallas kernels read
    one stacked array and raise a ValueError for them.
    `impl` is one of IMPLS ("reference", "xla", "dense_gather", "dense", "slots", "pallas_tpu",
    "pallas_gpu"),
    or the `select.Kernel` chosen (its interpret flag and tiles are used). For the Pallas ones
    `interpret=True` runs the kernels in interpret mode (any platform) and `tiles` overrides the
    backend's `default_tiles`.
    Raises TypeError / ValueError for inputs that do not fit params.
    """
    if isinstance(impl, select.Kernel):
        interpret = interpret or impl.interpret
        tiles = tiles or (Tiles(**dict(impl.tiles)) if impl.tiles else None)
        impl = impl.impl
    if impl not in IMPLS:
        raise ValueError(f"moe_ffn: unknown impl {impl!r}; valid: {sorted(IMPLS)}")
    if not isinstance(params, MoeParams):
        raise TypeError(f"moe_ffn: params must be a MoeParams, got {type(params).__name__}")

    def one(a: Any) -> Any:
        if not isinstance(a, PerExpert):
            return jnp.asarray(a)
        return PerExpert(tuple(map(jnp.asarray, a.arrays))) if isinstance(a.arrays, tuple | list) else a

    def arr(a: Any) -> Any:
        if a is None:
            return None
        return tuple(one(v) for v in a) if isinstance(a, tuple | list) else one(a)

    if hasattr(ids, "dtype") and jnp.dtype(ids.dtype) != jnp.int32:  # before asarray can narrow int64
        raise TypeError(f"moe_ffn: ids must be int32, got {ids.dtype}")
    x, weights, ids, w_down, b_down = (arr(a) for a in (x, weights, ids, w_down, b_down))
    ew = expert_weights(arr(w_in), w_down, arr(b_in), b_down, params)
    validate_inputs(x, weights, ids, ew, params)
    if has_per_expert(ew) and not IMPLS[impl].per_expert:
        raise ValueError(f"moe_ffn impl={impl!r}: {STACKED_ONLY}; use impl='xla' (or stack them)")
    return _moe(params, impl, KernelOptions(interpret, tiles), x, weights, ids, ew)
