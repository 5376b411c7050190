"""The Pallas route kernels (TPU and GPU) on a CPU host: interpret-mode numerics, lowering, end to end.

Numerics: interpret mode against `route_reference`, bitwise with each op rounded to its dtype (the
kernels compute the reference's formulas; selection must give the exact ids, ties and NaN order of
`lax.top_k`); the GPU kernel's bf16 arithmetic in float32 (`f32_ops`) against XLA's. Lowering:
`jax.export` for TPU under abstract v5e/v6e/v7x devices and for CUDA under an abstract H100,
through `moefuse.jit(..., platform=...)`, and the bf16 GPU kernel alone. End to end: zoo routers
through `moefuse.jit(..., platform=..., interpret=True)` equal the original. Interpret mode costs a
few seconds per configuration, so the fast tier is a few telling cases; the hypothesis sweep and
the whole router zoo are marked slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import moefuse
from moefuse.kernels.route import RouteParams, route, route_reference
from moefuse.kernels.route.f32_ops import float32_ops
from moefuse.kernels.route.pallas_gpu import route_pallas_gpu
from moefuse.kernels.route.pallas_tpu import route_pallas_tpu
from tests.zoo import routers

KERNELS = {"tpu": route_pallas_tpu, "gpu": route_pallas_gpu}
LING = dict(num_experts=64, k=8, score="sigmoid", selection_bias=True, n_group=8, topk_group=4,
            weights_from="scores", post=(("renorm", 1e-20), ("scale", 2.5)))  # fmt: skip


def _inputs(seed, t, p: RouteParams, dtype, ties=False):
    rng = np.random.default_rng(seed)
    e = p.num_experts
    x = rng.standard_normal((t, e))
    if ties:  # the second half of the experts repeats the first: every value is tied
        x[:, e // 2 :] = x[:, : e // 2]
    bias = jnp.asarray(rng.standard_normal(e) * 0.1, dtype) if p.selection_bias else None
    scale = jnp.asarray(rng.uniform(0.5, 2.0, e), dtype) if p.uses_expert_scale else None
    return jnp.asarray(x, dtype), bias, scale


# Every op's value in its own dtype: by default XLA:CPU keeps some bf16 intermediates in float32
# where it fuses ops (a bf16 softmax's exp), so its values then depend on the program around them.
# The kernels compute each op in its dtype, as XLA:GPU does for a bf16 softmax.
ROUNDING_PER_OP = {"xla_allow_excess_precision": False}


def _run(f, *args):
    """jax.jit(f)(*args), each op rounded to its dtype."""
    return jax.jit(f).lower(*args).compile(ROUNDING_PER_OP)(*args)


def _check(backend, p, logits, bias, scale, block_tokens=16):
    want = _run(lambda x, b, s: route_reference(x, p, b, s), logits, bias, scale)
    kernel = KERNELS[backend]
    run_kernel = lambda x, b, s: kernel(x, p, b, s, block_tokens=block_tokens, interpret=True)
    got = _run(run_kernel, logits, bias, scale)
    assert [g.dtype for g in got] == [w.dtype for w in want]
    for g, w in zip(got, want, strict=True):  # bitwise, NaN == NaN
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize(
    "case",
    [
        # Ling-2.6 (sigmoid, bias, 8 groups keep 4 by top-2 sum, pre-bias weights) on 37 tokens,
        # which do not fill the blocks of 16; bf16, where rounding ties are common
        dict(params=LING, t=37, dtype=jnp.bfloat16),
        # DeepSeek-V2 group_limited_greedy: softmax, max group score, fill 0; exact ties
        dict(
            params=dict(
                LING,
                score="softmax",
                selection_bias=False,
                group_score="max",
                group_fill=0.0,
                weights_from="selection",
                post=(("scale", 16.0),),
            ),
            t=20,
            ties=True,
        ),  # fmt: skip
        # one token, k = E, per-expert scale after renorm
        dict(
            params=dict(num_experts=8, k=8, score="sigmoid", post=(("renorm", 0.0), ("expert_scale",))), t=1
        ),
        # GPT-OSS: top-k of the logits, softmax over the k; scores exposed
        dict(params=dict(num_experts=32, k=4, order="topk_then_score", expose_scores=True), t=24),
        # Llama4: top-k of the logits, their sigmoid
        dict(params=dict(num_experts=16, k=1, order="topk_then_score", score="sigmoid", expose_scores=True),
             t=24),
    ],
    ids=["ling_bf16_partial_block", "dsv2_ties", "t1_k_eq_e", "topk_then_softmax", "topk_then_sigmoid"],
)
def test_kernel_equals_reference(backend, case):
    p = RouteParams(**case["params"])
    _check(backend, p, *_inputs(0, case["t"], p, case.get("dtype", jnp.float32), case.get("ties", False)))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_nan_inf_and_signed_zero_order_as_lax_top_k(backend):
    p = RouteParams(num_experts=8, k=8, score="none")
    row = [0.0, -0.0, 1.0, jnp.nan, -jnp.nan, jnp.inf, 1.0, -jnp.inf]
    _check(backend, p, jnp.asarray([row, row[::-1]], jnp.float32), None, None)


@pytest.mark.slow  # reason: interpret mode traces and compiles each drawn configuration (seconds each)
@settings(max_examples=12, deadline=None)
@given(
    backend=st.sampled_from(["tpu", "gpu"]),
    t=st.integers(1, 40),
    e_log2=st.integers(2, 6),
    k_log2=st.integers(0, 3),
    groups=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    score=st.sampled_from(["softmax", "sigmoid"]),
    group_score=st.sampled_from(["top2_sum", "max"]),
    weights_from=st.sampled_from(["selection", "scores"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    ties=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_kernel_equals_reference_sweep(backend, t, e_log2, k_log2, groups, score, group_score, weights_from,
                                       dtype, ties, seed):  # fmt: skip
    e = 1 << e_log2
    n_group, topk_group = groups
    if n_group > 1 and e // n_group < 2:
        n_group, topk_group = 1, 1
    p = RouteParams(num_experts=e, k=min(1 << k_log2, e), score=score, selection_bias=score == "sigmoid",
                    n_group=n_group, topk_group=topk_group, group_score=group_score,
                    weights_from=weights_from, post=(("renorm", 1e-20), ("scale", 2.0)))  # fmt: skip
    _check(backend, p, *_inputs(seed, t, p, dtype, ties), block_tokens=8 if backend == "gpu" else 16)


# ---- float32_ops: how the GPU kernel does 16-bit float arithmetic (Triton has no bf16 division) --

ALL_BF16 = jnp.asarray(np.arange(1 << 16, dtype=np.uint16).view(jnp.bfloat16))  # NaN, inf, subnormals


@pytest.mark.parametrize(
    "fn",
    [jax.nn.sigmoid, lambda x: jax.nn.softmax(x.reshape(256, 256), axis=-1), lambda x: x[::-1] / (x + 1)],
    ids=["sigmoid", "softmax", "div"],
)
def test_float32_ops_rounds_as_xla_does_in_bf16(fn):
    got, want = _run(float32_ops(fn), ALL_BF16), _run(fn, ALL_BF16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    eqns = jax.make_jaxpr(float32_ops(fn))(ALL_BF16).jaxpr.eqns
    reads_bf16 = {e.primitive.name for e in eqns if any(v.aval.dtype == jnp.bfloat16 for v in e.invars)}
    assert reads_bf16 == {"convert_element_type"}  # all arithmetic in float32


# ---- lowering for the chips, through moefuse.jit(..., platform=...) -----------------------------

TPU_KINDS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v7x": "TPU7x"}
ZOO = [routers.make_f4_ling_hf_port, routers.make_f1_mixtral_plain, routers.make_f5_sigmoid_expert_scale]


def _abstract(kind, platform, cores=1):
    return AbstractMesh(
        (), (), abstract_device=AbstractDevice(device_kind=kind, num_cores=cores, platform=platform)
    )


@pytest.mark.parametrize("chip", TPU_KINDS)
@pytest.mark.parametrize("make", ZOO, ids=lambda m: m.__name__[5:])
def test_exports_for_tpu_with_the_mosaic_kernel(chip, make):
    case = make()
    with use_abstract_mesh(_abstract(TPU_KINDS[chip], "tpu")):
        f = moefuse.jit(case.fn, platform="tpu")
        plan = f.plan(*case.args)
        module = export.export(f, platforms=("tpu",))(*case.args).mlir_module()
    assert plan.chip == chip and [s.kernel for s in plan.fused] == ["pallas_tpu"]
    assert module.count("tpu_custom_call") == 1


@pytest.mark.parametrize("make", ZOO, ids=lambda m: m.__name__[5:])
def test_exports_for_cuda_with_the_triton_kernel(make):
    case = make()
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with use_abstract_mesh(_abstract("NVIDIA H100 80GB HBM3", "gpu", 132)):
        f = moefuse.jit(case.fn, platform="gpu")
        plan = f.plan(*case.args)
        module = export.export(f, platforms=("cuda",), disabled_checks=[triton])(*case.args).mlir_module()
    assert plan.chip == "sm90" and [s.kernel for s in plan.fused] == ["pallas_gpu"]
    assert "__gpu$xla.gpu.triton" in module


@pytest.mark.parametrize(  # Ling's bf16 sigmoid: tests/compile/test_examples.py
    "params",
    [
        dict(num_experts=32, k=4, post=(("renorm", 0.0),), expose_scores=True),
        dict(num_experts=32, k=4, order="topk_then_score"),
    ],
    ids=["softmax_renorm", "topk_then_softmax"],
)
def test_bf16_exports_for_cuda(params):  # softmax and renorm divide, and Triton has no bf16 division
    p = RouteParams(**params)
    x, bias, _ = _inputs(0, 64, p, jnp.bfloat16)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    f = jax.jit(lambda x, b: route(x, p, bias=b, impl="pallas_gpu"))
    with use_abstract_mesh(_abstract("NVIDIA H100 80GB HBM3", "gpu", 132)):
        module = export.export(f, platforms=("cuda",), disabled_checks=[triton])(x, bias).mlir_module()
    assert "__gpu$xla.gpu.triton" in module


def test_gpu_declines_what_triton_blocks_cannot_hold():
    case = routers.make_f1_deepseek_v2_greedy()  # top-6 of 64: k is not a power of two
    (site,) = moefuse.jit(case.fn, platform="gpu").plan(*case.args).fused
    assert site.kernel == "xla"
    assert site.fallbacks == ("pallas_gpu: k=6 is not a power of two (Triton block shapes)",)


# ---- end to end: zoo routers through the kernels in interpret mode equal the original ----------


@pytest.mark.slow  # reason: 47 routers x 2 platforms, 1-4 s each in interpret mode
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("make", routers.ALL_ROUTERS, ids=lambda m: m.__name__[5:])
def test_router_zoo_through_the_kernels_equals_the_original(platform, make):
    case = make()
    fused = moefuse.jit(case.fn, platform=platform, interpret=True, verify=True)  # ids equal, weights close
    for site in fused.plan(*case.args).fused:  # the platform's kernel, or the reason it does not fit
        assert site.kernel == f"pallas_{platform}" or site.fallbacks[0].startswith(f"pallas_{platform}: ")
    fused(*case.args)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_zoo_router_through_the_kernel_equals_the_original(platform):
    case = routers.make_f4_ling_hf_port()
    fused = moefuse.jit(case.fn, platform=platform, interpret=True)
    assert [s.kernel for s in fused.plan(*case.args).fused] == [f"pallas_{platform}"]
    got, want = fused(*case.args), jax.jit(case.fn)(*case.args)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-7)
