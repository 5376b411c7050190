"""Tests of the Pallas kernels of the fused `moe_ffn` op (impl="pallas_tpu" / "pallas_gpu") on CPU.

Numerics run in interpret mode against the independent implementation of tests/kernels/test_moe.py
(a Python loop over experts with its own activation formulas and capacity counter), never against
the kernels' own code: forward, gradients, both dtypes, every activation and gate/up layout, routings
that leave experts empty, send everything to one expert, drop by capacity or carry out-of-range ids,
and shapes that do not divide the tiles. The kernels alone (`gmm`, `tgmm`) are checked against
einsums over the tile layout, and the layout against its invariants (hypothesis). Lowering: the
kernels' custom calls in `jax.export` modules for TPU (abstract v5e / v6e / v7x) and CUDA (abstract
H100), of the op and of a whole zoo block through `moefuse.jit(..., platform=...)`. End to end: the
MoE block zoo through `moefuse.jit(..., platform=..., interpret=True, verify=True)` equals jax.jit of
the original (the Ling-2.6 block in the default run, every fused block in the slow tier).
Interpret mode costs seconds per compiled configuration: routings that share a shape share one
compilation; the default run keeps one forward per backend, the rest is marked slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh

import moefuse
from moefuse.kernels.moe import MoeParams, Tiles, grouped, moe_ffn, pallas_gpu, pallas_tpu
from tests.kernels.test_moe import (
    ACTIVATION_CASES,
    BF16,
    F32,
    independent_live,
    independent_moe,
    make_inputs,
    op_args,
)
from tests.patterns.test_moe_zoo import FUSED as MOE_ZOO_FUSED
from tests.zoo import moe_blocks

IMPLS = ("pallas_tpu", "pallas_gpu")
BACKENDS = {"pallas_tpu": pallas_tpu.BACKEND, "pallas_gpu": pallas_gpu.BACKEND}
GRAD = dict(rtol=1e-4, atol=1e-4)
# small blocks so that the test shapes run several F / K / N blocks per tile
MULTI_BLOCK = {"pallas_tpu": Tiles(block_rows=8, block_f=128, block_k=128, block_n=128),
               "pallas_gpu": Tiles(block_rows=16, block_f=16, block_k=16, block_n=32)}


def routings(t: int, k: int, e: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Named [T, k] routings of one shape (they share one compilation)."""
    rng = np.random.default_rng(seed)
    distinct = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    out = {"random": distinct}
    out["all to one set"] = np.tile(distinct[:1], (t, 1))  # every token the same k experts
    out["two experts"] = np.where(rng.random((t, k)) < 0.8, 0, e - 1).astype(np.int32)  # the rest empty
    oob = distinct.copy()
    oob[::3, 0] = -1
    oob[1::4, -1] = e + 2
    out["out of range"] = oob
    return out


@functools.cache
def _forward(p: MoeParams, impl: str, tiles: Tiles | None):
    def fwd(x, w, i, ew):
        w_in, w_down, b_in, b_down = op_args(ew)
        return moe_ffn(x, w, i, w_in, w_down, p, b_in=b_in, b_down=b_down, impl=impl, interpret=True,
                       tiles=tiles)

    return jax.jit(fwd)


@functools.cache
def _grad(p: MoeParams, impl: str | None, tiles: Tiles | None):
    """Gradient of sum(out * cot) w.r.t. (x, weights, expert weights); impl None: the independent one."""

    def loss(x, w, i, ew, cot, live):
        if impl is None:
            out = independent_moe(p, x, w, i, ew, live)
        else:
            w_in, w_down, b_in, b_down = op_args(ew)
            out = moe_ffn(x, w, i, w_in, w_down, p, b_in=b_in, b_down=b_down, impl=impl, interpret=True,
                          tiles=tiles)
        return jnp.sum(out.astype(jnp.float32) * cot)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 3)))


@functools.cache
def _independent(p: MoeParams, round_to=None):
    return jax.jit(lambda x, w, i, ew, live: independent_moe(p, x, w, i, ew, live, round_to=round_to))


def _exact(x, weights, ew):
    """bf16 inputs upcast to f32: the kernels (f32 accumulation, f32 epilogues) are checked against the
    f32 result of the same inputs, rounded only where a bf16 kernel stores in bf16 (the hidden
    activations, each expert's output, each weighted output: `independent_moe(round_to=)`), not
    against the bf16 arithmetic of the independent implementation."""
    if x.dtype == jnp.float32:
        return x, weights, ew
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return f32(x), f32(weights), jax.tree.map(f32, ew)


def check_forward(p: MoeParams, impl: str, x, weights, ids, ew, tiles=None, tol=F32, label=""):
    live = independent_live(ids, p)
    xf, wf, ewf = _exact(x, weights, ew)
    want = _independent(p, None if x.dtype == jnp.float32 else x.dtype)(xf, wf, ids, ewf, live)
    got = _forward(p, impl, tiles)(x, weights, ids, ew)
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol,
                               err_msg=f"{impl} {label}")


def check_grad(p: MoeParams, impl: str, x, weights, ids, ew, tiles=None, label=""):
    """Gradients against jax.grad of the independent implementation on the inputs upcast to f32.

    f32 inputs: elementwise within GRAD; these cases check the kernels' logic entry by entry.
    bf16 inputs check precision handling, and no elementwise tolerance models bf16 gradients: an entry
    is a sum over tokens whose terms cancel, so its error scales with the terms, not with the entry (an
    entry of 0.1 out of terms of 5 can be off by 0.08). The criterion is norm-wise, as is usual for
    rounding error: on each gradient, the kernel's error norm against the f32 gradient is at most twice
    that of jax.grad of the same program run in bf16 (the independent implementation on the bf16
    inputs, same compute and weights dtypes; the factor of two is FlashAttention's test convention for
    an implementation that rounds at other points), and never needs to beat the bf16 rounding of its
    own output (2**-8 of the f32 gradient's norm). Measured on 16 seeded SwiGLU cases: the kernels'
    norm-wise error is 0.4-1.1x that of plain bf16 (elementwise maxima: 0.3-1.7x)."""
    live = jnp.asarray(independent_live(ids, p))
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape), jnp.float32)
    xf, wf, ewf = _exact(x, weights, ew)
    want = _grad(p, None, None)(xf, wf, ids, ewf, cot, live)
    got = _grad(p, impl, tiles)(x, weights, ids, ew, cot, live)
    bf16 = x.dtype != jnp.float32
    plain = jax.tree.leaves(_grad(p, None, None)(x, weights, ids, ew, cot, live)) if bf16 else None
    leaves = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                 jax.tree.leaves((x, weights, ew)))
    for n, ((path, g), w, primal) in enumerate(leaves):
        assert g.dtype == primal.dtype and g.shape == w.shape
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        where = f"{impl} {label} {jax.tree_util.keystr(path)}"
        if plain is None:
            np.testing.assert_allclose(g, w, **GRAD, err_msg=where)
            continue
        assert np.isfinite(g).all(), where
        err = np.linalg.norm(g - w)
        plain_err = np.linalg.norm(np.asarray(plain[n], np.float32) - w)
        assert err <= max(2 * plain_err, 2.0**-8 * np.linalg.norm(w)), (
            f"{where}: error norm {err:.4g} against the f32 gradient; jax.grad in bf16: {plain_err:.4g}")


# ---- the tile layout (pure XLA) -----------------------------------------------------------------------

@pytest.mark.slow  # 40 examples, ~45 s on 2 cores (each compiles its layout)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.integers(1, 9), st.data(), st.sampled_from([8, 16]),
       st.sampled_from([None, 0, 1, 3]))
def test_tile_layout_invariants(t, e, data, bm, capacity):
    k = data.draw(st.integers(1, e))
    ids = np.asarray(data.draw(st.lists(st.lists(st.integers(-1, e), min_size=k, max_size=k),
                                        min_size=t, max_size=t)), np.int32)
    p = MoeParams(num_experts=e, k=k, capacity=capacity)
    lay = jax.tree.map(np.asarray, grouped.tile_layout(jnp.asarray(ids), p, bm))
    live = independent_live(ids, p)
    n, nt = t * k, grouped.max_tiles(t * k, e, bm)
    np.testing.assert_array_equal(lay.live, live)
    counts = np.bincount(ids[live], minlength=e)
    tiles_per_expert = -(-counts // bm)
    na = int(lay.num_active[0])
    assert na == tiles_per_expert.sum() <= nt and lay.tile_expert.shape == (nt,)
    np.testing.assert_array_equal(np.diff(lay.expert_tiles), tiles_per_expert)  # empty experts: no tile
    np.testing.assert_array_equal(lay.tile_expert[:na], np.repeat(np.arange(e), tiles_per_expert))
    assert lay.row_assign.shape == ((nt + 1) * bm,)
    flat = np.arange(n).reshape(t, k)
    # every live assignment has its own row, in a tile of its expert, in (t, j) order within the expert
    rows = lay.row_of[live]
    assert len(set(rows.tolist())) == len(rows)
    np.testing.assert_array_equal(lay.row_assign[rows], flat[live])
    np.testing.assert_array_equal(lay.tile_expert[rows // bm], ids[live])
    for ex in range(e):
        mine = np.sort(lay.row_of[live & (ids == ex)])
        np.testing.assert_array_equal(mine, lay.expert_tiles[ex] * bm + np.arange(counts[ex]))
    # every other row is padding (assignment n: the zero row)
    pad = np.setdiff1d(np.arange(lay.row_assign.shape[0]), rows)
    np.testing.assert_array_equal(lay.row_assign[pad], n)


# ---- the kernels alone ----------------------------------------------------------------------------

# (tiles, K, N): several K and N blocks per tile
KERNEL_CASES = {"pallas_tpu": (Tiles(block_rows=16, block_f=128, block_k=128, block_n=128), 320, 200),
                "pallas_gpu": (Tiles(block_rows=16, block_f=16, block_k=16, block_n=32), 48, 80)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transpose", [False, True])
def test_gmm_and_tgmm(impl, transpose):
    """gmm and tgmm against einsums over the layout, several K and N blocks (TPU: partial last blocks,
    masked), experts 1..3 empty."""
    backend, (tiles, kdim, n) = BACKENDS[impl], KERNEL_CASES[impl]
    e, t, k, bm = 5, 19, 2, tiles.block_rows
    ids = jnp.asarray(routings(t, k, e)["two experts"])
    lay = grouped.tile_layout(ids, MoeParams(num_experts=e, k=k), bm)
    assert not np.diff(np.asarray(lay.expert_tiles))[1:-1].any()
    rng = np.random.default_rng(1)
    r = lay.row_assign.shape[0]
    valid = (np.asarray(lay.row_assign) < t * k)[:, None]  # padding rows are zero rows in the op
    lhs = jnp.asarray(rng.standard_normal((r, kdim)) * valid, jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((e, n, kdim) if transpose else (e, kdim, n)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    got = jax.jit(lambda a, b, c: backend.gmm(a, b, lay, tiles, True, transpose_rhs=transpose, bias=c))(
        lhs, rhs, bias)
    er = np.concatenate([np.asarray(lay.tile_expert), [0]])[np.arange(r) // bm]  # expert of each row
    w = np.swapaxes(np.asarray(rhs), 1, 2) if transpose else np.asarray(rhs)
    want = np.einsum("rk,rkn->rn", np.asarray(lhs), w[er]) + np.asarray(bias)[er]
    active = np.arange(r) // bm < int(lay.num_active[0])  # rows of skipped tiles are never read
    # f32 sums of up to 320 products of unit normals (results ~30): rounding ~1e-5 absolute
    np.testing.assert_allclose(np.asarray(got)[active], want[active], rtol=1e-5, atol=1e-4)
    other = jnp.asarray(rng.standard_normal((r, n)) * valid, jnp.float32)
    got_t = jax.jit(lambda a, b: backend.tgmm(a, b, lay, e, tiles, True))(lhs, other)
    want_t = np.stack([np.asarray(lhs)[active & (er == ex)].T @ np.asarray(other)[active & (er == ex)]
                       for ex in range(e)])
    np.testing.assert_allclose(np.asarray(got_t), want_t, rtol=1e-4, atol=1e-4)
    assert not np.asarray(got_t)[1:4].any()


# ---- the op end to end, forward (default run) ---------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_forward_routings_multi_block(impl):
    """SwiGLU, fused concat gate/up with biases, T=19 (not a multiple of the row tile), several F / K / N
    blocks per tile: four routings (random, all to one set of experts, two experts of five, out-of-range)."""
    p = MoeParams(num_experts=5, k=2, activation="swiglu", fused_gate_up=True, has_expert_bias=True)
    d, f = (128, 320) if impl == "pallas_tpu" else (48, 80)  # TPU: F = 2.5 blocks, the last one masked
    for name, ids in routings(19, 2, 5).items():
        x, weights, ids, ew = make_inputs(p, t=19, d=d, f=f, ids=ids, seed=2)
        check_forward(p, impl, x, weights, ids, ew, tiles=MULTI_BLOCK[impl], label=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_bf16_default_tiles(impl):
    p = MoeParams(num_experts=4, k=2, activation="geglu", has_expert_bias=True)
    x, weights, ids, ew = make_inputs(p, t=24, dtype=jnp.bfloat16)
    check_forward(p, impl, x, weights, ids, ew, tol=BF16)


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_on_input_forward(impl):
    """Llama4's form: each routed row scaled by its weight before the kernels, the k outputs summed
    unweighted (f32, several blocks per tile, biases, four routings)."""
    p = MoeParams(num_experts=5, k=2, activation="swiglu", has_expert_bias=True, weights_on_input=True)
    for name, ids in routings(19, 2, 5, seed=6).items():
        x, weights, ids, ew = make_inputs(p, t=19, d=48, f=80, ids=ids, seed=5)
        check_forward(p, impl, x, weights, ids, ew, tiles=MULTI_BLOCK[impl], label=name)


# ---- forward and backward, heavier (slow) -----------------------------------------------------------

@pytest.mark.slow  # interpret mode: ~30 s per backend on 2 shared cores
@pytest.mark.parametrize("impl", IMPLS)
def test_grad_routings_multi_block(impl):
    p = MoeParams(num_experts=5, k=2, activation="swiglu", fused_gate_up=True, has_expert_bias=True)
    d, f = (128, 320) if impl == "pallas_tpu" else (48, 80)
    for name, ids in routings(19, 2, 5, seed=4).items():
        x, weights, ids, ew = make_inputs(p, t=19, d=d, f=f, ids=ids, seed=3)
        check_grad(p, impl, x, weights, ids, ew, tiles=MULTI_BLOCK[impl], label=name)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_weights_on_input_grad(impl):
    """The routed backward through the scaled rows: d(weights) and dx from the rows' gradient."""
    p = MoeParams(num_experts=5, k=2, activation="swiglu", has_expert_bias=True, weights_on_input=True)
    for name, ids in routings(19, 2, 5, seed=7).items():
        x, weights, ids, ew = make_inputs(p, t=19, d=48, f=80, ids=ids, seed=8)
        check_grad(p, impl, x, weights, ids, ew, tiles=MULTI_BLOCK[impl], label=name)


@pytest.mark.slow  # 11 configurations x 2 backends, forward and gradient
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act, fused, layout, bias, approx", ACTIVATION_CASES)
def test_activations_and_layouts(impl, act, fused, layout, bias, approx):
    p = MoeParams(num_experts=4, k=2, activation=act, fused_gate_up=fused, gate_up_layout=layout,
                  has_expert_bias=bias, gelu_approximate=approx)
    x, weights, ids, ew = make_inputs(p, t=20, scale=4.0)  # large enough that the GPT-OSS clamp bites
    check_forward(p, impl, x, weights, ids, ew)
    check_grad(p, impl, x, weights, ids, ew)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t, k, e, ids", [
    (1, 2, 8, [[5, 2]]),                        # T=1
    (6, 1, 8, None),                            # k=1, most experts empty
    (8, 4, 4, [[0, 1, 2, 3]] * 8),              # k=E
    (40, 1, 4, [[2]] * 40),                     # all tokens to one expert
    (16, 2, 4, [[1, 1]] * 8 + [[3, 3]] * 8),    # one expert twice for a token
])
def test_routing_edge_cases(impl, t, k, e, ids):
    p = MoeParams(num_experts=e, k=k, activation="swiglu")
    x, weights, ids, ew = make_inputs(p, t=t, ids=ids, seed=t)
    check_forward(p, impl, x, weights, ids, ew)
    check_grad(p, impl, x, weights, ids, ew)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order, groups, capacity",
                         [("slot_major", 1, 5), ("token_major", 2, 3), ("slot_major", 1, 0)])
def test_capacity_runs_in_the_kernel_layout(impl, order, groups, capacity):
    """Capacity dispatch: the dropped assignments get no row (the live mask is the XLA one)."""
    p = MoeParams(num_experts=4, k=2, capacity=capacity, capacity_order=order, capacity_groups=groups,
                  activation="geglu", has_expert_bias=True)
    x, weights, ids, ew = make_inputs(p, t=16, seed=capacity)
    assert not independent_live(ids, p).all()
    check_forward(p, impl, x, weights, ids, ew)
    check_grad(p, impl, x, weights, ids, ew)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("compute, wdt", [(None, None), ("float32", None), (None, "float32")])
def test_bf16_forward_and_grad(impl, compute, wdt):
    p = MoeParams(num_experts=4, k=2, activation="swiglu", fused_gate_up=True, has_expert_bias=True,
                  compute_dtype=compute, weights_dtype=wdt)
    x, weights, ids, ew = make_inputs(p, t=24, dtype=jnp.bfloat16)
    check_forward(p, impl, x, weights, ids, ew, tol=BF16)
    check_grad(p, impl, x, weights, ids, ew)


@pytest.mark.slow  # each example compiles its own configuration (~30 s)
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(1, 33), e=st.integers(1, 9), data=st.data(), d=st.sampled_from([8, 24]),
       f=st.sampled_from([16, 40]), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_hypothesis_shapes(impl, t, e, data, d, f, dtype):
    k = data.draw(st.integers(1, e), label="k")
    routing = data.draw(st.sampled_from(["random", "all to one set", "two experts", "out of range"]))
    p = MoeParams(num_experts=e, k=k, activation=data.draw(st.sampled_from(["swiglu", "gelu", "swiglu_oai"])))
    dt = jnp.dtype(dtype)
    x, weights, ids, ew = make_inputs(p, t=t, d=d, f=f, ids=routings(t, k, e)[routing], dtype=dt)
    check_forward(p, impl, x, weights, ids, ew, tol=F32 if dt == jnp.float32 else BF16)
    check_grad(p, impl, x, weights, ids, ew)


# ---- lowering ------------------------------------------------------------------------------------------

TPU_KINDS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v7x": "TPU7x"}
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
TRITON_CALL = "__gpu$xla.gpu.triton"


def _export_counts(impl: str, platform: str, device: AbstractDevice, dtype, **kw) -> tuple[int, int]:
    """Kernel custom calls in the exported forward and gradient of one SwiGLU (fused gate/up) layer."""
    p = MoeParams(num_experts=8, k=2, activation="swiglu", fused_gate_up=True, has_expert_bias=True)
    s = jax.ShapeDtypeStruct
    t, d, f, e = 256, 256, 512, 8
    args = (s((t, d), dtype), s((t, 2), jnp.float32), s((t, 2), jnp.int32), s((e, d, 2 * f), dtype),
            s((e, f, d), dtype), s((e, 2 * f), dtype), s((e, d), dtype))

    def fwd(x, w, i, wi, wd, bi, bd):
        return moe_ffn(x, w, i, wi, wd, p, b_in=bi, b_down=bd, impl=impl)

    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 3, 4, 5, 6))
    call = "tpu_custom_call" if platform == "tpu" else TRITON_CALL
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        return tuple(export.export(jax.jit(fn), platforms=(platform,), **kw)(*args).mlir_module().count(call)
                     for fn in (fwd, grad))


@pytest.mark.parametrize("chip", ["v5e", pytest.param("v6e", marks=pytest.mark.slow),
                                  pytest.param("v7x", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_lowering(chip, dtype):
    device = AbstractDevice(device_kind=TPU_KINDS[chip], num_cores=1, platform="tpu")
    # forward: the one fused FFN kernel; gradient: it again plus 5 gmm (gate, up, dh, 2 x dx) and 3 tgmm
    assert _export_counts("pallas_tpu", "tpu", device, dtype) == (1, 9)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_cuda_lowering(dtype):
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    # forward: gate/up + activation, down; gradient: those again plus 5 gmm and 3 tgmm
    assert _export_counts("pallas_gpu", "cuda", H100, dtype, disabled_checks=checks) == (2, 10)


# ---- whole programs through moefuse.jit(..., platform=...): the MoE block zoo ----------------------

PLATFORM_CALLS = {"tpu": "tpu_custom_call", "gpu": TRITON_CALL}


def _zoo_block_exports(platform: str, device: AbstractDevice, export_platform: str, **kw):
    """(the Plan's kernels, the kernel custom calls in the module) of the Ling-2.6 zoo block exported
    through moefuse.jit(..., platform=platform) under an abstract `device` mesh."""
    case = moe_blocks.make_shared_ling26_block()  # group-limited sigmoid router, bf16 experts, shared expert
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        f = moefuse.jit(case.fn, platform=platform)
        plan = f.plan(*case.args)
        module = export.export(f, platforms=(export_platform,), **kw)(*case.args).mlir_module()
    return plan, module.count(PLATFORM_CALLS[platform])


@pytest.mark.parametrize("chip", TPU_KINDS)
def test_zoo_block_exports_for_tpu_with_both_kernels(chip):
    device = AbstractDevice(device_kind=TPU_KINDS[chip], num_cores=1, platform="tpu")
    plan, calls = _zoo_block_exports("tpu", device, "tpu")
    assert plan.chip == chip and [(s.op, s.kernel) for s in plan.fused] == [("route", "pallas_tpu"),
                                                                           ("moe", "pallas_tpu")]
    assert calls == 2  # the router kernel, the fused expert-FFN kernel


def test_zoo_block_exports_for_cuda_with_both_kernels():
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    plan, calls = _zoo_block_exports("gpu", H100, "cuda", disabled_checks=checks)
    assert plan.chip == "sm90" and [(s.op, s.kernel) for s in plan.fused] == [("route", "pallas_gpu"),
                                                                             ("moe", "pallas_gpu")]
    assert calls == 3  # the router kernel, gate/up + activation, down


def _through_the_kernels_equals_the_original(make, platform: str) -> None:
    case = make()
    fused = moefuse.jit(case.fn, platform=platform, interpret=True, verify=True)
    for site in fused.plan(*case.args).fused:  # the platform's kernel, or the reason it does not fit
        assert site.kernel == f"pallas_{platform}" or site.fallbacks[0].startswith(f"pallas_{platform}: ")
    fused(*case.args)  # verify=True: ids equal, outputs within the dtype's tolerance of jax.jit(original)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_ling_block_through_the_kernels_equals_the_original(platform):
    _through_the_kernels_equals_the_original(moe_blocks.make_shared_ling26_block, platform)


@pytest.mark.slow  # reason: 22 blocks x 2 platforms, 3-15 s each in interpret mode
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("make", [m for m in moe_blocks.ALL_MOE_BLOCKS if m.__name__[5:] in MOE_ZOO_FUSED],
                         ids=lambda m: m.__name__[5:])
def test_moe_zoo_through_the_kernels_equals_the_original(platform, make):
    _through_the_kernels_equals_the_original(make, platform)
