"""Tests of the fused `moe_ffn` op against an independent, straightforward implementation.

The expected values never come from `moe_ffn_reference`: `independent_moe` below is a Python loop
over experts with masks, its own activation formulas (transliterated from the model code they come
from) and a Python/numpy capacity counter. Every implementation (`VARIANTS`) must match it:
f32 within 1e-5, bf16 within ~1e-2, NaN positions equal, gradients (f32) equal to jax.grad of it.

Shapes are chosen to drive every path of the XLA implementation: the sparse path (T*k < 2E, no
capacity pass), the capacity pass alone, and the per-expert loop with one and several blocks of each
size. The XLA implementation decides at run time (from the expert loads) whether its capacity pass
runs, so every check runs both branches: the capacity pass forced on, and forced off (the loop over
every expert with rows); the choice itself is tested on its own and end to end under heavy skew (and
by every fused program in tests/patterns).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

from moefuse import _compat as C
from moefuse.kernels.moe import MoeParams, PerExpert, moe_ffn, schedule, xla
from tests.tiers import default_run_keeps

# impl or impl/branch: the XLA implementation with its run-time choice of the capacity pass forced
VARIANTS = ("reference", "xla/capacity-pass", "xla/loop-only", "dense_gather", "dense", "slots")


def variants(p: MoeParams) -> tuple[str, ...]:
    """The variants that take p: "dense" drops no tokens and runs the experts on the tokens as they are
    (it refuses a capacity and weights_on_input), "slots" needs a capacity (each refusal is tested on
    its own)."""
    skip = {"slots"} if p.capacity is None else {"dense"}
    if p.weights_on_input:
        skip.add("dense")
    return tuple(v for v in VARIANTS if v not in skip)
F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1e-2, atol=1e-2)


# ---- the independent implementation ------------------------------------------------------------


def _gelu(v, approximate):
    if approximate:
        return 0.5 * v * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    return 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))


def _sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def _expert_mlp(p: MoeParams, v, w, round_h=None):
    """One expert, written the way model code writes it (GPT-OSS, Mixtral, Switch ...).

    round_h: a dtype the hidden activations are rounded to before the down projection (the input of
    a kernel's second matmul), or None."""
    if p.fused_gate_up:
        gate_up = v @ w["w_in"] + (w["b_in"] if "b_in" in w else 0)
        if p.gate_up_layout == "interleaved":  # GPT-OSS: gate_up[..., ::2], gate_up[..., 1::2]
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        else:
            f = gate_up.shape[-1] // 2
            gate, up = gate_up[..., :f], gate_up[..., f:]
    else:
        gate = v @ w["w_in"] + (w["b_in"] if "b_in" in w else 0)
        up = v @ w["w_up"] + (w["b_up"] if "b_up" in w else 0) if "w_up" in w else None
    act = p.activation
    if act == "swiglu":
        h = gate * _sigmoid(gate) * up
    elif act == "geglu":
        h = _gelu(gate, p.gelu_approximate) * up
    elif act == "swiglu_oai":  # HF GptOssExperts
        gate = jnp.minimum(gate, p.swiglu_limit)
        up = jnp.clip(up, -p.swiglu_limit, p.swiglu_limit)
        glu = gate * _sigmoid(gate * p.swiglu_alpha)
        h = (up + 1) * glu
    elif act == "gelu":
        h = _gelu(gate, p.gelu_approximate)
    elif act == "relu":
        h = jnp.maximum(gate, 0)
    else:
        h = gate * _sigmoid(gate)
    if round_h is not None:
        h = h.astype(round_h).astype(h.dtype)
    return h @ w["w_down"] + (w["b_down"] if "b_down" in w else 0)


def independent_live(ids: np.ndarray, p: MoeParams) -> np.ndarray:
    """Which assignments survive: expert in range, and under the capacity in priority order."""
    ids = np.asarray(ids)
    t, k = ids.shape
    live = (ids >= 0) & (ids < p.num_experts)
    if p.capacity is None:
        return live
    tg = t // p.capacity_groups
    for g in range(p.capacity_groups):
        used = [0] * p.num_experts
        tokens = range(g * tg, (g + 1) * tg)
        if p.capacity_order == "slot_major":
            order = [(tt, j) for j in range(k) for tt in tokens]
        else:
            order = [(tt, j) for tt in tokens for j in range(k)]
        for tt, j in order:
            if live[tt, j]:
                if used[ids[tt, j]] < p.capacity:
                    used[ids[tt, j]] += 1
                else:
                    live[tt, j] = False
    return live


def independent_moe(p: MoeParams, x, weights, ids, ew, live, round_to=None):
    """for e in range(E): run expert e on all tokens, add its weighted output where routed to e.

    round_to: on f32 inputs, the dtype (bfloat16) of a fused kernel's inputs, which it stores three
    intermediates in: the hidden activations (the down projection's input), each expert's output, and
    each weighted output before the f32 sum over the k slots. None: no rounding but the inputs' own."""
    cdt = jnp.dtype(p.compute_dtype or x.dtype)
    wdt = jnp.dtype(p.weights_dtype) if p.weights_dtype else jnp.result_type(cdt, weights.dtype)
    out = jnp.zeros(x.shape, wdt)
    if p.weights_on_input:  # Llama4: each token scaled by its weight, the experts' outputs summed
        for e in range(p.num_experts):
            for j in range(p.k):
                sdt = jnp.result_type(x.dtype, weights.dtype)  # x * w as jnp multiplies them
                v = (x.astype(sdt) * weights[:, j, None].astype(sdt)).astype(cdt)
                y = _expert_mlp(p, v, {n: a[e].astype(cdt) for n, a in ew.items()}).astype(wdt)
                out = out + jnp.where(((ids[:, j] == e) & live[:, j])[:, None], y, 0)
        return out.astype(x.dtype)
    for e in range(p.num_experts):
        y_e = _expert_mlp(p, x.astype(cdt), {n: a[e].astype(cdt) for n, a in ew.items()}, round_to)
        if round_to is not None:
            y_e = y_e.astype(round_to)
        y_e = y_e.astype(wdt)
        for j in range(p.k):
            routed = (ids[:, j] == e) & live[:, j]
            contrib = weights[:, j, None].astype(wdt) * y_e
            if round_to is not None:
                contrib = contrib.astype(round_to).astype(wdt)
            out = out + jnp.where(routed[:, None], contrib, 0)
    return out.astype(x.dtype)


# ---- inputs --------------------------------------------------------------------------------------


def make_inputs(p: MoeParams, t, d=8, f=16, ids=None, dtype=jnp.float32, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)

    def normal(shape, s):
        return jnp.asarray(s * rng.standard_normal(shape), dtype)

    e = p.num_experts
    x = normal((t, d), scale)
    weights = jnp.asarray(rng.random((t, p.k)) + 0.1, dtype)
    if ids is None:  # skewed: expert 0 popular, so the loop runs
        ids = np.stack([rng.permutation(e)[: p.k] for _ in range(t)])
        popular = np.argwhere(ids[: t - t // 8] == 0)
        ids[popular[:, 0], popular[:, 1]] = ids[popular[:, 0], 0]  # swap expert 0 into slot 0 ...
        ids[: t - t // 8, 0] = 0  # ... for 7/8 of the tokens
    ids = jnp.asarray(ids, jnp.int32)
    f_in = 2 * f if p.fused_gate_up else f
    ew = {"w_in": normal((e, d, f_in), d**-0.5)}
    if p.is_glu and not p.fused_gate_up:
        ew["w_up"] = normal((e, d, f), d**-0.5)
    ew["w_down"] = normal((e, f, d), f**-0.5)
    if p.has_expert_bias:
        ew["b_in"] = normal((e, f_in), 0.5)
        if "w_up" in ew:
            ew["b_up"] = normal((e, f), 0.5)
        ew["b_down"] = normal((e, d), 0.5)
    return x, weights, ids, ew


def op_args(ew):
    """(w_in, w_down, b_in, b_down) in moe_ffn's argument convention."""
    w_in = (ew["w_in"], ew["w_up"]) if "w_up" in ew else ew["w_in"]
    b_in = (ew["b_in"], ew["b_up"]) if "b_up" in ew else ew.get("b_in")
    return w_in, ew["w_down"], b_in, ew.get("b_down")


@contextlib.contextmanager
def forced_branch(branch: str):
    """Trace the XLA implementation with its capacity pass forced on ("capacity-pass") or off."""
    if not branch:
        yield
        return
    decide = xla.use_capacity_pass
    xla.use_capacity_pass = lambda counts, sched: jnp.full((), branch == "capacity-pass" and sched.c0 > 0)
    try:
        yield
    finally:
        xla.use_capacity_pass = decide


def run(p: MoeParams, variant, x, weights, ids, ew):
    impl, _, branch = variant.partition("/")
    w_in, w_down, b_in, b_down = op_args(ew)
    f = jax.jit(lambda x, w, i, wi, wd, bi, bd: moe_ffn(x, w, i, wi, wd, p, b_in=bi, b_down=bd, impl=impl))
    with forced_branch(branch):
        return f(x, weights, ids, w_in, w_down, b_in, b_down)


def check(p: MoeParams, x, weights, ids, ew, tol=F32):
    live = independent_live(ids, p)
    want = jax.jit(lambda x, w, i, ew: independent_moe(p, x, w, i, ew, live))(x, weights, ids, ew)
    for variant in variants(p):
        got = run(p, variant, x, weights, ids, ew)
        assert got.dtype == x.dtype and got.shape == x.shape, variant
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), **tol, err_msg=variant
        )
    return want, live


# ---- forward -------------------------------------------------------------------------------------

ACTIVATION_CASES = [  # (activation, fused_gate_up, layout, bias, gelu_approximate)
    ("swiglu", False, "concat", False, True),
    ("swiglu", True, "concat", True, True),
    ("swiglu", True, "interleaved", False, True),
    ("geglu", False, "concat", True, True),
    ("geglu", True, "concat", False, False),
    ("swiglu_oai", True, "interleaved", True, True),
    ("swiglu_oai", False, "concat", False, True),
    ("gelu", False, "concat", True, False),
    ("gelu", False, "concat", False, True),
    ("relu", False, "concat", False, True),
    ("silu", False, "concat", True, True),
]


@pytest.mark.parametrize(
    "act, fused, layout, bias, approx", default_run_keeps(ACTIVATION_CASES, 1, 2, 4, 5, 7, 9, 10)
)
def test_activations_and_layouts(act, fused, layout, bias, approx):
    p = MoeParams(
        num_experts=4,
        k=2,
        activation=act,
        fused_gate_up=fused,
        gate_up_layout=layout,
        has_expert_bias=bias,
        gelu_approximate=approx,
    )
    # T*k/E = 16: capacity pass (C0=24) plus the loop for the popular expert 0 (> 24 rows)
    x, weights, ids, ew = make_inputs(p, t=32, scale=4.0)  # large enough that the GPT-OSS clamp bites
    assert np.bincount(np.asarray(ids).ravel()).max() > schedule(32, 2, 4).c0
    check(p, x, weights, ids, ew)


@pytest.mark.parametrize(
    "t, k, e, ids",
    default_run_keeps([
        (1, 2, 8, [[5, 2]]),  # T=1 (sparse path)
        (6, 1, 8, None),  # k=1, sparse path, most experts empty
        (8, 4, 4, [[0, 1, 2, 3]] * 8),  # k=E: every token to every expert
        (128, 1, 4, [[2]] * 128),  # all tokens to one expert: one block of
        # 128 (all rows, or the 80 past C0=48)
        (32, 2, 16, None),  # experts with no tokens (T*k/E = 4)
        (24, 2, 32, None),  # sparse path, blocks of 64, 16 and 8
        (16, 2, 4, [[1, 1]] * 8 + [[3, 3]] * 8),  # ties: one expert twice for a token
        (12, 2, 4, [[-1, 0], [4, 1], [2, 9], [3, -5]] * 3),  # out-of-range ids contribute nothing
    ], 0, 2, 6, 7),
)
def test_routing_edge_cases(t, k, e, ids):
    p = MoeParams(num_experts=e, k=k, activation="swiglu")
    x, weights, ids_, ew = make_inputs(p, t=t, ids=ids, seed=t)
    if ids is not None and len({tuple(r) for r in ids}) <= 2 and t == 16:
        weights = jnp.full_like(weights, 0.5)  # equal weights as well
    check(p, x, weights, ids_, ew)


@pytest.mark.parametrize(
    "order, t, e, capacity, groups",
    default_run_keeps([
        ("slot_major", 32, 4, 10, 1),  # C0 = 16 >= capacity: the capacity pass holds every kept row
        ("token_major", 32, 4, 10, 1),
        ("slot_major", 32, 4, 6, 2),  # per-group capacity (MaxText: per batch row)
        ("token_major", 8, 16, 1, 1),  # sparse path
        ("slot_major", 32, 4, 0, 1),  # everything dropped
    ], 0, 2, 4),
)
def test_capacity_drops_the_same_tokens(order, t, e, capacity, groups):
    p = MoeParams(
        num_experts=e,
        k=2,
        capacity=capacity,
        capacity_order=order,
        capacity_groups=groups,
        activation="geglu",
        has_expert_bias=True,
    )
    x, weights, ids, ew = make_inputs(p, t=t, seed=capacity)
    want, live = check(p, x, weights, ids, ew)
    assert not live.all()  # the capacity overflows ...
    if capacity:
        assert live.any()
        dropped = ~live.any(axis=1)  # ... and tokens that lost every slot get exactly 0
        np.testing.assert_array_equal(np.asarray(want)[dropped], 0.0)


def test_capacity_orders_differ():
    ids = [[0, 1]] * 4 + [[1, 0]] * 4
    slot = independent_live(np.array(ids), MoeParams(num_experts=2, k=2, capacity=4))
    token = independent_live(
        np.array(ids), MoeParams(num_experts=2, k=2, capacity=4, capacity_order="token_major")
    )
    assert (slot != token).any()
    for order in ("slot_major", "token_major"):
        p = MoeParams(num_experts=2, k=2, capacity=4, capacity_order=order)
        check(p, *make_inputs(p, t=8, ids=ids))


@pytest.mark.parametrize("compute, wdt", [(None, None), ("float32", None), (None, "float32")])
def test_bf16(compute, wdt):
    p = MoeParams(
        num_experts=4,
        k=2,
        activation="swiglu",
        fused_gate_up=True,
        has_expert_bias=True,
        compute_dtype=compute,
        weights_dtype=wdt,
    )
    x, weights, ids, ew = make_inputs(p, t=32, dtype=jnp.bfloat16)
    check(p, x, weights, ids, ew, tol=BF16)


def test_mixed_dtypes_follow_compute_dtype():
    p = MoeParams(num_experts=4, k=2, compute_dtype="float32")
    x, weights, ids, ew = make_inputs(p, t=16)
    ew = {n: a.astype(jnp.bfloat16) for n, a in ew.items()}
    check(p, x.astype(jnp.bfloat16), weights, ids, ew, tol=BF16)


@pytest.mark.parametrize("t, e", [(32, 4), (4, 8)])
def test_nan_in_x_stays_in_its_token(t, e):
    p = MoeParams(num_experts=e, k=2, activation="swiglu_oai", has_expert_bias=True)
    x, weights, ids, ew = make_inputs(p, t=t)
    x = x.at[1, 3].set(jnp.nan).at[t - 1, 0].set(jnp.inf)
    want, _ = check(p, x, weights, ids, ew)
    bad = ~np.isfinite(np.asarray(want)).all(axis=1)
    assert bad[1] and bad[:-1].sum() == 1  # only the poisoned tokens (inf may or may not turn to NaN)


# ---- gradients -----------------------------------------------------------------------------------

GRAD_CASES = [  # (params kwargs, T): capacity pass + loop, sparse path, capacity drops
    (dict(num_experts=4, k=2, activation="swiglu"), 32),
    (dict(num_experts=4, k=1, activation="relu", has_expert_bias=True), 128),  # full + tail blocks
    (
        dict(
            num_experts=4,
            k=2,
            activation="swiglu_oai",
            fused_gate_up=True,
            gate_up_layout="interleaved",
            has_expert_bias=True,
        ),
        64,
    ),
    (dict(num_experts=8, k=2, activation="gelu", has_expert_bias=True), 6),
    (dict(num_experts=4, k=2, activation="geglu", fused_gate_up=True, capacity=12, has_expert_bias=True), 32),
    (dict(num_experts=4, k=2, activation="swiglu", capacity=5, capacity_groups=2,
          capacity_order="token_major"), 16),
]


def independent_grads(kw: dict, t: int) -> tuple:
    """(p, x, weights, ids, ew, cot, grads): a GRAD_CASES case, a cotangent of its output, and the
    gradients of <independent_moe, cot> with respect to x, weights and the expert weights."""
    p = MoeParams(**kw)
    x, weights, ids, ew = make_inputs(p, t=t, seed=3, ids=[[1]] * t if p.k == 1 else None)
    live = independent_live(ids, p)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape), jnp.float32)

    def loss_independent(x, w, ew):
        return jnp.sum(independent_moe(p, x, w, ids, ew, live) * cot)

    return p, x, weights, ids, ew, cot, jax.jit(jax.grad(loss_independent, argnums=(0, 1, 2)))(x, weights, ew)


@pytest.mark.parametrize("kw, t", default_run_keeps(GRAD_CASES, 0, 1, 4))
def test_grad_matches_independent(kw, t):
    p, x, weights, ids, ew, cot, want = independent_grads(kw, t)
    for variant in variants(p):
        impl, _, branch = variant.partition("/")

        def loss(x, w, ew, impl=impl):
            w_in, w_down, b_in, b_down = op_args(ew)
            return jnp.sum(moe_ffn(x, w, ids, w_in, w_down, p, b_in=b_in, b_down=b_down, impl=impl) * cot)

        with forced_branch(branch):
            got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weights, ew)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(
                np.asarray(g),
                np.asarray(w),
                rtol=1e-4,
                atol=1e-4,
                err_msg=f"{variant} {jax.tree_util.keystr(path)}",
            )


# ---- weights on the input (Llama4) ------------------------------------------------------------------

WEIGHTS_ON_INPUT_CASES = [  # (params kwargs, T, ids)
    (dict(num_experts=4, k=2, activation="swiglu"), 32, None),  # capacity pass + loop
    (dict(num_experts=8, k=2, activation="swiglu"), 1, [[5, 2]]),  # T=1 (sparse path)
    (dict(num_experts=8, k=1, activation="swiglu"), 6, None),  # top-1, most experts empty
    (dict(num_experts=8, k=2, activation="gelu", has_expert_bias=True), 16, None),  # biases, empty experts
    (dict(num_experts=4, k=2, activation="swiglu_oai", fused_gate_up=True, gate_up_layout="interleaved",
          has_expert_bias=True), 64, None),
    (dict(num_experts=4, k=2, activation="geglu", capacity=6), 16, None),  # capacity drops
    (dict(num_experts=4, k=2, activation="silu"), 12, [[-1, 0], [4, 1], [2, 9], [3, -5]] * 3),  # out of range
]


@pytest.mark.parametrize("kw, t, ids", default_run_keeps(WEIGHTS_ON_INPUT_CASES, 0, 1, 5, 6))
def test_weights_on_input_forward(kw, t, ids):
    p = MoeParams(**kw, weights_on_input=True)
    x, weights, ids, ew = make_inputs(p, t=t, ids=ids, seed=t, scale=2.0)
    want, _ = check(p, x, weights, ids, ew)
    # the usual form differs (no FFN here is positively homogeneous, as ReLU without biases would be)
    usual = run(dataclasses.replace(p, weights_on_input=False), "reference", x, weights, ids, ew)
    assert not np.allclose(np.asarray(usual), np.asarray(want), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("x_dtype, w_dtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_weights_on_input_bf16(x_dtype, w_dtype):
    """bf16 tokens scaled by bf16 weights (the product in bf16) or by f32 weights (in f32, then bf16
    rows: cdt is x's dtype)."""
    p = MoeParams(num_experts=4, k=2, activation="swiglu", has_expert_bias=True, weights_on_input=True)
    x, weights, ids, ew = make_inputs(p, t=32, dtype=jnp.bfloat16)
    check(p, x.astype(x_dtype), weights.astype(w_dtype), ids, ew, tol=BF16)


def test_weights_on_input_rounds_the_product_to_its_dtype():
    """bf16 tokens times bf16 weights into f32 experts: each row is the bf16 product (as the program's
    `x * w` rounds it) cast up, also where XLA would skip a cast down and back up (excess precision).
    Expected: the rows rounded by numpy, each slot run through the independent loop with weight 1."""
    p = MoeParams(num_experts=4, k=2, compute_dtype="float32", out_dtype="float32", weights_on_input=True)
    x, weights, ids, ew = make_inputs(p, t=32, dtype=jnp.bfloat16, seed=11)
    ew = {n: a.astype(jnp.float32) for n, a in ew.items()}
    exact = np.asarray(x, np.float32)[:, None, :] * np.asarray(weights, np.float32)[..., None]
    rows = exact.astype(jnp.bfloat16).astype(np.float32)
    assert (rows != exact).any()
    one = MoeParams(num_experts=4, k=1)

    def per_slot(v):
        return sum(independent_moe(one, jnp.asarray(v[:, j]), jnp.ones((32, 1)), ids[:, j:j + 1], ew,
                                   independent_live(ids[:, j:j + 1], one)) for j in range(2))

    want, unrounded = per_slot(rows), per_slot(exact)
    assert np.abs(np.asarray(want - unrounded)).max() > 1e-3  # the rounding is visible at this tolerance
    for variant in variants(p):
        got = run(p, variant, x, weights, ids, ew)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32, err_msg=variant)


@pytest.mark.parametrize("kw, t, ids", default_run_keeps(WEIGHTS_ON_INPUT_CASES[:5], 0, 1))
def test_weights_on_input_grad(kw, t, ids):
    """Gradients to x, the weights (through the scaling of the rows) and every expert weight."""
    p = MoeParams(**kw, weights_on_input=True)
    x, weights, ids, ew = make_inputs(p, t=t, ids=ids, seed=t + 1)
    live = independent_live(ids, p)
    cot = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
    want = jax.jit(jax.grad(lambda x, w, ew: jnp.sum(independent_moe(p, x, w, ids, ew, live) * cot),
                            argnums=(0, 1, 2)))(x, weights, ew)
    assert np.abs(np.asarray(want[1])).max() > 0.1  # the weights get a gradient through the rows
    for variant in variants(p):
        impl, _, branch = variant.partition("/")

        def loss(x, w, ew, impl=impl):
            w_in, w_down, b_in, b_down = op_args(ew)
            return jnp.sum(moe_ffn(x, w, ids, w_in, w_down, p, b_in=b_in, b_down=b_down, impl=impl) * cot)

        with forced_branch(branch):
            got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weights, ew)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4,
                                       err_msg=f"{variant} {jax.tree_util.keystr(path)}")


@pytest.mark.slow  # ~11 s on 2 cores
def test_weights_on_input_bf16_grad_is_as_accurate_as_the_program():
    """bf16 gradients, measured against the f32 gradient of the same inputs: within twice the error of
    jax.grad of the independent program run in bf16."""
    p = MoeParams(num_experts=4, k=2, activation="swiglu", has_expert_bias=True, weights_on_input=True)
    x, weights, ids, ew = make_inputs(p, t=32, dtype=jnp.bfloat16, seed=7)
    live = independent_live(ids, p)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)

    def grads(fn, *args):
        return jax.jit(jax.grad(lambda x, w, ew: jnp.sum(fn(x, w, ew).astype(jnp.float32) * cot),
                                argnums=(0, 1, 2)))(*args)

    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (x, weights, ew))
    exact = grads(lambda x, w, ew: independent_moe(p, x, w, ids, ew, live), *f32)
    program = grads(lambda x, w, ew: independent_moe(p, x, w, ids, ew, live), x, weights, ew)
    for variant in variants(p):
        impl, _, branch = variant.partition("/")

        def fused(x, w, ew, impl=impl):
            w_in, w_down, b_in, b_down = op_args(ew)
            return moe_ffn(x, w, ids, w_in, w_down, p, b_in=b_in, b_down=b_down, impl=impl)

        with forced_branch(branch):
            got = grads(fused, x, weights, ew)
        for g, w, e in zip(jax.tree.leaves(got), jax.tree.leaves(program), jax.tree.leaves(exact)):
            assert g.dtype == w.dtype
            g, w, e = (np.asarray(a, np.float32) for a in (g, w, e))
            assert np.linalg.norm(g - e) <= 2 * np.linalg.norm(w - e) + 1e-3 * np.linalg.norm(e), variant


def test_dense_refuses_weights_on_input():
    p = MoeParams(num_experts=4, k=2, weights_on_input=True)
    x, weights, ids, ew = make_inputs(p, t=8)
    with pytest.raises(ValueError, match="weights_on_input"):
        run(p, "dense", x, weights, ids, ew)


def test_dense_refuses_a_capacity():
    p = MoeParams(num_experts=4, k=2, activation="gelu", capacity=4)
    x, weights, ids, ew = make_inputs(p, t=8)
    with pytest.raises(ValueError, match="does not drop tokens"):
        run(p, "dense", x, weights, ids, ew)


def test_slots_refuses_a_dropless_site():
    p = MoeParams(num_experts=4, k=2, activation="gelu")
    x, weights, ids, ew = make_inputs(p, t=8)
    with pytest.raises(ValueError, match="needs params.capacity"):
        run(p, "slots", x, weights, ids, ew)


def test_dense_keeps_the_dense_originals_nan_of_an_unselected_expert():
    """An inf in an expert nobody selects reaches the output through its zero combine weight, as in
    a dense original; the other implementations leave it out (the op's reference)."""
    p = MoeParams(num_experts=4, k=1, activation="gelu")
    x, weights, ids, ew = make_inputs(p, t=4, ids=[[0]] * 4)
    ew = {**ew, "w_down": ew["w_down"].at[3].set(jnp.inf)}
    assert np.isfinite(np.asarray(run(p, "xla/loop-only", x, weights, ids, ew))).all()
    assert np.isnan(np.asarray(run(p, "dense", x, weights, ids, ew))).any()


@pytest.mark.parametrize("branch", ["capacity-pass", "loop-only"])
def test_xla_grad_nan_stays_in_its_token(branch):
    """The routed backward keeps a NaN token's poison to its own row and its own experts.

    (The reference's dense VJP multiplies the NaN row by zero cotangents of every expert, so there
    every expert-weight gradient turns NaN; this is where the two backwards are allowed to differ.)
    """
    p = MoeParams(num_experts=4, k=2, activation="swiglu", has_expert_bias=True)
    # expert 0 gets 60 rows: capacity pass (C0=48) plus two loop blocks of 8, or (loop only) two blocks
    # of 32; either reads past its rows into expert 1's first rows, where the poisoned token sits
    ids = np.array([[0, 2]] * 60 + [[1, 3]] * 4, np.int32)
    x, weights, ids, ew = make_inputs(p, t=64, ids=ids, seed=5)
    assert schedule(64, 2, 4) == (48, (128, 32, 8))
    assert [int(c) for c in xla.block_counts(jnp.array(60), (128, 32, 8))] == [0, 2, 0]
    assert [int(c) for c in xla.block_counts(jnp.array(12), (128, 32, 8))] == [0, 0, 2]
    bad = 60
    x = x.at[bad, 1].set(jnp.nan)

    def grads(fn, x, w, i):
        return jax.jit(jax.grad(lambda x, w, ew: jnp.sum(fn(x, w, i, ew) ** 2), argnums=(0, 1, 2)))(x, w, ew)

    def xla_fn(x, w, i, ew):
        w_in, w_down, b_in, b_down = op_args(ew)
        return moe_ffn(x, w, i, w_in, w_down, p, b_in=b_in, b_down=b_down)

    with forced_branch(branch):
        gx, gw, gew = grads(xla_fn, x, weights, ids)
    keep = np.arange(64) != bad
    ids_c = ids[keep]
    live = independent_live(ids_c, p)
    cx, cw, cew = grads(
        lambda x, w, i, ew: independent_moe(p, x, w, i, ew, live), x[keep], weights[keep], ids_c
    )
    np.testing.assert_allclose(np.asarray(gx)[keep], np.asarray(cx), **F32)
    np.testing.assert_allclose(np.asarray(gw)[keep], np.asarray(cw), **F32)
    assert np.isnan(np.asarray(gx)[bad]).any()
    untouched = [e for e in range(4) if e not in np.asarray(ids[bad])]
    for name in ew:
        np.testing.assert_allclose(np.asarray(gew[name])[untouched], np.asarray(cew[name])[untouched], **F32)


def zipf_ids(t: int, k: int, e: int, s: float, seed: int = 0) -> np.ndarray:
    """[T, k] distinct experts per token, expert popularity ~ 1 / rank^s (Gumbel top-k)."""
    rng = np.random.default_rng(seed)
    scores = -s * np.log(np.arange(1, e + 1))[rng.permutation(e)] + rng.gumbel(size=(t, e))
    return np.argsort(-scores, axis=1)[:, :k].astype(np.int32)


@pytest.mark.slow  # 15-90 s a case on 2 cores
@pytest.mark.parametrize(
    "t, k, e, ids",
    [
        (600, 1, 2, [[0]] * 600),  # all tokens to one expert: loop blocks 256, 256, 64, 16, 8
        (128, 2, 16, zipf_ids(128, 2, 16, 2.0)),  # heavy skew
        (96, 4, 8, zipf_ids(96, 4, 8, 0.0)),  # balanced
    ],
)
def test_heavy_skew_and_balanced_forward_and_grad(t, k, e, ids):
    p = MoeParams(num_experts=e, k=k, activation="swiglu", has_expert_bias=True)
    x, weights, ids, ew = make_inputs(p, t=t, ids=ids, seed=t)
    live = independent_live(ids, p)
    check(p, x, weights, ids, ew)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    want = jax.jit(
        jax.grad(lambda x, w, ew: jnp.sum(independent_moe(p, x, w, ids, ew, live) * cot), argnums=(0, 1, 2))
    )(x, weights, ew)

    def loss(x, w, ew):
        w_in, w_down, b_in, b_down = op_args(ew)
        return jnp.sum(moe_ffn(x, w, ids, w_in, w_down, p, b_in=b_in, b_down=b_down) * cot)

    for branch in ("", "capacity-pass", "loop-only"):
        with forced_branch(branch):
            got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weights, ew)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4, err_msg=branch)


def test_capacity_pass_decision():
    """The run-time choice: the capacity pass for balanced loads, the loop alone under heavy skew."""
    sched = schedule(256, 4, 64)
    assert bool(xla.use_capacity_pass(jnp.full((64,), 16, jnp.int32), sched))
    zipf = np.bincount(zipf_ids(256, 4, 64, 1.0).ravel(), minlength=64)
    assert bool(xla.use_capacity_pass(jnp.asarray(zipf), sched))
    hot = jnp.zeros((64,), jnp.int32).at[:4].set(240).at[4:10].set(10)
    assert not bool(xla.use_capacity_pass(hot, sched))
    assert not bool(xla.use_capacity_pass(jnp.ones((64,), jnp.int32), schedule(4, 2, 64)))  # decode
    blocks = sched.blocks
    assert [int(c) for c in xla.block_counts(jnp.array(600), blocks)] == [2, 1, 1, 1]
    assert [int(c) for c in xla.block_counts(jnp.array(240), blocks)] == [1, 0, 0, 0]  # 16 rows padding
    assert [int(c) for c in xla.block_counts(jnp.array(100), blocks)] == [0, 2, 0, 0]
    assert [int(c) for c in xla.block_counts(jnp.array(8), blocks)] == [0, 0, 0, 1]
    assert [int(c) for c in xla.block_counts(jnp.array(0), blocks)] == [0, 0, 0, 0]


# ---- expert weights as E separate arrays (PerExpert) ---------------------------------------------


def per_expert(ew, names=None):
    """ew with the arrays `names` (default: all) given as E separate arrays, expert e's the slice a[e]."""
    return {n: PerExpert(tuple(a[i] for i in range(a.shape[0]))) if names is None or n in names else a
            for n, a in ew.items()}


def _stacked_grads(tree):
    """A gradient pytree with every PerExpert's arrays stacked back on an expert axis (for comparison)."""
    return jax.tree.map(lambda g: jnp.stack(g.arrays) if isinstance(g, PerExpert) else g, tree,
                        is_leaf=lambda g: isinstance(g, PerExpert))


PER_EXPERT_IMPLS = ("reference", "xla", "dense_gather")


@pytest.mark.parametrize(
    "act, fused, layout, bias, approx", default_run_keeps(ACTIVATION_CASES, 1, 5, 10)
)
def test_per_expert_arrays_give_the_stacked_result(act, fused, layout, bias, approx):
    """Per-expert arrays against the independent loop over the stacked ones, and against the same impl
    on the stacked arrays (the XLA schedule then has no capacity pass: C0 = 0)."""
    p = MoeParams(num_experts=4, k=2, activation=act, fused_gate_up=fused, gate_up_layout=layout,
                  has_expert_bias=bias, gelu_approximate=approx)
    x, weights, ids, ew = make_inputs(p, t=32, scale=4.0)
    want, _ = check(p, x, weights, ids, ew)
    for impl in PER_EXPERT_IMPLS:
        got = run(p, impl, x, weights, ids, per_expert(ew))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32, err_msg=impl)
        np.testing.assert_allclose(np.asarray(got), np.asarray(run(p, impl, x, weights, ids, ew)), **F32)


@pytest.mark.parametrize(
    "t, k, e, ids, names",
    default_run_keeps([
        (1, 2, 8, [[5, 2]], None),  # T=1 (decode)
        (8, 4, 4, [[0, 1, 2, 3]] * 8, None),  # k=E
        (32, 2, 16, None, None),  # experts with no tokens
        (600, 1, 2, [[0]] * 600, None),  # one expert, loop blocks of 256, 256, 64, 16, 8
        (12, 2, 4, [[-1, 0], [4, 1], [2, 9], [3, -5]] * 3, None),  # out-of-range ids
        (32, 2, 4, None, ("w_down",)),  # only W_down per expert, W_gate / W_up stacked
    ], 0, 4, 5),
)
def test_per_expert_routing_edge_cases(t, k, e, ids, names):
    p = MoeParams(num_experts=e, k=k, activation="swiglu")
    x, weights, ids, ew = make_inputs(p, t=t, ids=ids, seed=t)
    live = independent_live(ids, p)
    want = jax.jit(lambda x, w, i, ew: independent_moe(p, x, w, i, ew, live))(x, weights, ids, ew)
    for impl in PER_EXPERT_IMPLS:
        got = run(p, impl, x, weights, ids, per_expert(ew, names))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32, err_msg=impl)


@pytest.mark.parametrize("kw, t", default_run_keeps(GRAD_CASES, 0, 4))
def test_per_expert_grads_match_independent(kw, t):
    """Each per-expert array gets its own gradient: expert e's the e-th slice of the stacked one."""
    p, x, weights, ids, ew, cot, want = independent_grads(kw, t)
    for impl in PER_EXPERT_IMPLS:

        def loss(x, w, ew, impl=impl):
            w_in, w_down, b_in, b_down = op_args(ew)
            return jnp.sum(moe_ffn(x, w, ids, w_in, w_down, p, b_in=b_in, b_down=b_down, impl=impl) * cot)

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weights, per_expert(ew))
        assert all(isinstance(got[2][n], PerExpert) and len(got[2][n].arrays) == p.num_experts for n in ew)
        got = _stacked_grads(got)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4,
                                       err_msg=f"{impl} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("impl", PER_EXPERT_IMPLS)
def test_per_expert_arrays_are_never_stacked(impl):
    """The forwards read each expert's arrays where they are: no value in their programs has the
    stacked [E, D, F] / [E, F, D] shape (the backward's gradient buffers are stacked, then split)."""
    p = MoeParams(num_experts=4, k=2, activation="swiglu")
    x, weights, ids, ew = make_inputs(p, t=32, d=8, f=16)
    w_in, w_down, _, _ = op_args(per_expert(ew))
    closed = jax.make_jaxpr(lambda *a: moe_ffn(*a, p, impl=impl))(x, weights, ids, w_in, w_down)
    stacked = {(4, 8, 16), (4, 16, 8)}

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (tuple(v.aval.shape) for v in eqn.outvars)
            for _, _, body in C.sub_jaxprs(eqn):
                yield from shapes(C.as_closed(body).jaxpr)

    assert not stacked & set(shapes(closed.jaxpr))


def test_per_expert_arrays_are_validated():
    p = MoeParams(num_experts=4, k=2)
    x, weights, ids, ew = make_inputs(p, t=4)
    pe = per_expert(ew)
    w_in = (pe["w_in"], pe["w_up"])
    with pytest.raises(ValueError, match=r"w_down as PerExpert must hold a tuple of E=4 arrays, got 3"):
        moe_ffn(x, weights, ids, w_in, PerExpert(pe["w_down"].arrays[:3]), p)
    uneven = PerExpert((*pe["w_down"].arrays[:3], jnp.zeros((16, 9), jnp.float32)))
    with pytest.raises(ValueError, match="w_down: the per-expert arrays differ in shape or dtype"):
        moe_ffn(x, weights, ids, w_in, uneven, p)
    mixed = PerExpert((*pe["w_down"].arrays[:3], pe["w_down"].arrays[3].astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="differ in shape or dtype"):
        moe_ffn(x, weights, ids, w_in, mixed, p)
    with pytest.raises(ValueError, match=r"w_in must have shape \(4, 8, 16\)"):
        moe_ffn(x, weights, ids, (PerExpert(tuple(a[:, :8] for a in pe["w_in"].arrays)), pe["w_up"]),
                pe["w_down"], p)


@pytest.mark.parametrize("impl", ["dense", "pallas_tpu", "pallas_gpu"])
def test_stacked_only_kernels_refuse_per_expert_arrays(impl):
    """They read one stacked array: they raise rather than stack the arrays on every call."""
    p = MoeParams(num_experts=4, k=2)
    x, weights, ids, ew = make_inputs(p, t=4)
    w_in, w_down, _, _ = op_args(per_expert(ew))
    with pytest.raises(ValueError, match="expert weights are E separate arrays; this kernel reads one "
                                         "stacked array"):
        moe_ffn(x, weights, ids, w_in, w_down, p, impl=impl, interpret=True)


# ---- lowering, structure, validation ---------------------------------------------------------------


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_impl_lowers(platform):
    p = MoeParams(num_experts=8, k=2, activation="swiglu", fused_gate_up=True, has_expert_bias=True)
    s = jax.ShapeDtypeStruct
    args = (
        s((64, 32), jnp.bfloat16),
        s((64, 2), jnp.float32),
        s((64, 2), jnp.int32),
        s((8, 32, 128), jnp.bfloat16),
        s((8, 64, 32), jnp.bfloat16),
        s((8, 128), jnp.bfloat16),
        s((8, 32), jnp.bfloat16),
    )

    def f(x, w, i, wi, wd, bi, bd):
        return moe_ffn(x, w, i, wi, wd, p, b_in=bi, b_down=bd)

    fwd = jax.export.export(jax.jit(f), platforms=(platform,))(*args)
    assert fwd.out_avals[0].shape == (64, 32)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 3, 4, 5, 6)))
    assert jax.export.export(grad, platforms=(platform,))(*args).out_avals[2].shape == (8, 32, 128)


def test_no_captured_constants_and_schedule():
    for t, k, e in ((256, 4, 64), (2, 2, 64)):
        p = MoeParams(num_experts=e, k=k, capacity=t // 2)
        x, weights, ids, ew = make_inputs(p, t=t)
        w_in, w_down, _, _ = op_args(ew)

        def fwd(*a, p=p):
            return moe_ffn(*a, p)

        for fn in (fwd, jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 3, 4))):
            assert jax.make_jaxpr(fn)(x, weights, ids, w_in, w_down).consts == []
    # capacity pass of 1.5 x mean rows (when it runs); loop blocks of 256, a quarter of it, ... 8
    assert schedule(256, 4, 64) == (24, (256, 64, 16, 8))
    assert schedule(4, 2, 64) == (0, (8,))  # decode: no capacity pass
    assert schedule(256, 4, 64, capacity=20) == (24, (32, 8)) and schedule(256, 4, 64, capacity=9).c0 == 16


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ids=np.zeros((4, 2), np.int64)), TypeError, "ids must be int32"),
        (dict(ids=jnp.zeros((4, 2), jnp.float32)), TypeError, "ids must be int32"),
        (dict(ids=np.zeros((4, 3), np.int32)), ValueError, r"ids must be \[T=4, k=2\]"),
        (dict(weights=np.zeros((4, 1), np.float32)), ValueError, "weights must be"),
        (dict(x=np.zeros((4, 8), np.int32)), TypeError, "x must be floating"),
        (dict(x=np.zeros((4, 6), np.float32)), ValueError, "D=8, x has D=6"),
        (dict(w_in="single"), TypeError, r"needs w_in = \(w_gate, w_up\)"),
        (dict(w_down=np.zeros((3, 16, 8), np.float32)), ValueError, "w_down must be"),
        (dict(b_down=np.zeros((4, 8), np.float32)), ValueError, "has_expert_bias is False"),
        (dict(impl="pallas"), ValueError, "unknown impl"),
    ],
)
def test_invalid_inputs(kwargs, error, match):
    p = MoeParams(num_experts=4, k=2)
    x, weights, ids, ew = make_inputs(p, t=4)
    a = dict(
        x=x,
        weights=weights,
        ids=ids,
        w_in=(ew["w_in"], ew["w_up"]),
        w_down=ew["w_down"],
        b_down=None,
        impl="xla",
    )
    a.update(kwargs)
    if isinstance(a["w_in"], str):
        a["w_in"] = ew["w_in"]
    with pytest.raises(error, match=match):
        moe_ffn(a["x"], a["weights"], a["ids"], a["w_in"], a["w_down"], p, b_down=a["b_down"], impl=a["impl"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="tanh"), "unknown activation"),
        (dict(activation="relu", fused_gate_up=True), "needs a GLU activation"),
        (dict(capacity=-1), "capacity"),
        (dict(compute_dtype="int8"), "floating"),
        (dict(num_experts=0), "num_experts"),
    ],
)
def test_invalid_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoeParams(**{"num_experts": 4, "k": 2, **kwargs})


def test_params_hashable_and_missing_bias():
    p = MoeParams(num_experts=4, k=2, has_expert_bias=True)
    assert hash(p) == hash(MoeParams(num_experts=4, k=2, has_expert_bias=True))
    x, weights, ids, ew = make_inputs(MoeParams(num_experts=4, k=2), t=4)
    with pytest.raises(ValueError, match="needs both b_in and b_down"):
        moe_ffn(x, weights, ids, (ew["w_in"], ew["w_up"]), ew["w_down"], p)


# ---- projection_dtype: each projection rounded apart (ragged_dot / einsum preferred_element_type) ----


def _combined_f32(p: MoeParams, x, weights, ids, expert_out):
    """sum over k of weights * expert_out(e)(x) in f32, expert e's rows where ids == e (written out)."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(p.num_experts):
        y_e = expert_out(e).astype(jnp.float32)
        for j in range(p.k):
            out = out + jnp.where((ids[:, j] == e)[:, None], weights[:, j, None] * y_e, 0)
    return out


def _rounded_moe(p: MoeParams, x, weights, ids, ew, pdt):
    """independent_moe with each projection of f32 operands rounded to pdt (None: not rounded), the
    activation in that dtype, and the down projection reading it upcast, as model code writes it."""

    def mm(v, w):
        y = v.astype(jnp.float32) @ w
        return y if pdt is None else y.astype(pdt)

    def expert(e):
        gate = mm(x, ew["w_in"][e])
        # the activation in pdt, spelled as model code spells it (1 / (1 + exp(-g)) rounds otherwise in bf16)
        h = jnp.maximum(gate, 0) if p.activation == "relu" else jax.nn.silu(gate) * mm(x, ew["w_up"][e])
        return mm(h, ew["w_down"][e])

    return _combined_f32(p, x, weights, ids, expert)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("t", [32, pytest.param(4, marks=pytest.mark.slow)])
def test_projection_dtype_rounds_each_projection(activation, t):
    """f32 operands, bf16 projections: the fused op is much closer to the program that rounds each
    projection than that program is to the unrounded one (so the rounding is not dropped)."""
    p = MoeParams(num_experts=4, k=2, activation=activation, projection_dtype="bfloat16")
    x, weights, ids, ew = make_inputs(p, t=t, seed=5)
    # under jit, as the model runs (XLA CPU rounds bf16 elementwise chains differently op by op)
    rounded = jax.jit(lambda *a: _rounded_moe(p, *a, jnp.bfloat16))(x, weights, ids, ew)
    unrounded = jax.jit(lambda *a: _rounded_moe(p, *a, None))(x, weights, ids, ew)
    gap = float(jnp.max(jnp.abs(rounded - unrounded)))
    assert gap > 1e-3  # the rounding is visible at this size
    for variant in ("reference", "xla/capacity-pass", "xla/loop-only"):
        got = run(p, variant, x, weights, ids, ew)
        assert got.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(got - rounded)))
        assert err <= 0.1 * gap, (variant, err, gap)


def test_projection_dtype_gradients_match_the_rounded_program():
    """Backward rounding is not fixed by the forward (where a bf16 cotangent is rounded differs between
    autodiff spellings), so: every gradient within one bf16 ulp of its scale of the rounded program's."""
    p = MoeParams(num_experts=4, k=2, activation="swiglu", projection_dtype="bfloat16")
    x, weights, ids, ew = make_inputs(p, t=32, seed=6)
    cot = jnp.asarray(np.random.default_rng(10).standard_normal(x.shape), jnp.float32)
    loss_of = lambda x, w, ew: jnp.sum(_rounded_moe(p, x, w, ids, ew, jnp.bfloat16) * cot)  # noqa: E731
    want = jax.jit(jax.grad(loss_of, (0, 1, 2)))(x, weights, ew)
    ulp = float(jnp.finfo(jnp.bfloat16).eps)
    for variant in ("reference", "xla/capacity-pass", "xla/loop-only"):
        impl, _, branch = variant.partition("/")

        def loss(x, w, ew, impl=impl):
            w_in, w_down, _, _ = op_args(ew)
            return jnp.sum(moe_ffn(x, w, ids, w_in, w_down, p, impl=impl) * cot)

        with forced_branch(branch):
            got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weights, ew)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.dtype == w.dtype and g.shape == w.shape
            err, scale = float(jnp.max(jnp.abs(g - w))), float(jnp.max(jnp.abs(w)))
            assert err <= ulp * scale, (variant, err, scale)


def _f32_accumulated_moe(p: MoeParams, x, weights, ids, ew, pdt, hdt):
    """independent_moe on bf16 operands with each matmul's products in pdt (preferred_element_type),
    the activation in pdt, and the hidden rows cast to hdt before the down matmul (SGLang-JAX style)."""
    mm = lambda v, w: jnp.dot(v, w, preferred_element_type=pdt)  # noqa: E731
    def expert(e):
        return mm((jax.nn.silu(mm(x, ew["w_in"][e])) * mm(x, ew["w_up"][e])).astype(hdt), ew["w_down"][e])

    return _combined_f32(p, x, weights, ids, expert).astype(x.dtype)


def test_hidden_dtype_casts_the_activation_before_the_down_projection():
    """bf16 operands, f32 projections, hidden rows cast back to bf16: the fused op is the program that
    does so (exactly, both under jit), not the one that stays in bf16 throughout."""
    p = MoeParams(num_experts=4, k=2, activation="swiglu", projection_dtype="float32",
                  hidden_dtype="bfloat16", weights_dtype="float32")
    x, weights, ids, ew = make_inputs(p, t=32, seed=7, dtype=jnp.bfloat16)
    weights = weights.astype(jnp.float32)
    want = jax.jit(lambda *a: _f32_accumulated_moe(p, *a, jnp.float32, jnp.bfloat16))(x, weights, ids, ew)
    in_bf16 = jax.jit(lambda *a: _f32_accumulated_moe(p, *a, jnp.bfloat16, jnp.bfloat16))(
        x, weights, ids, ew)
    gap = float(jnp.max(jnp.abs(want.astype(jnp.float32) - in_bf16.astype(jnp.float32))))
    assert gap > 1e-3
    for variant in ("reference", "xla/capacity-pass", "xla/loop-only"):
        got = run(p, variant, x, weights, ids, ew)
        assert got.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        assert err <= 0.1 * gap, (variant, err, gap)


def _rounded_then_upcast_moe(p: MoeParams, x, weights, ids, ew, pdt):
    """independent_moe with biases on f32 operands: each matmul rounded to pdt and upcast back to f32
    (pdt None: not rounded), the biases and the activation in f32 (GPT-OSS in EasyDeL)."""
    mm = lambda v, w: (v @ w).astype(pdt or jnp.float32).astype(jnp.float32)  # noqa: E731
    def expert(e):
        gate, up = mm(x, ew["w_in"][e]) + ew["b_in"][e], mm(x, ew["w_up"][e]) + ew["b_up"][e]
        return mm(jax.nn.silu(gate) * up, ew["w_down"][e]) + ew["b_down"][e]

    return _combined_f32(p, x, weights, ids, expert)


def test_activation_dtype_takes_rounded_projections_back_to_f32_with_biases():
    p = MoeParams(num_experts=4, k=2, activation="swiglu", has_expert_bias=True,
                  projection_dtype="bfloat16", activation_dtype="float32")
    x, weights, ids, ew = make_inputs(p, t=32, seed=8)
    want = jax.jit(lambda *a: _rounded_then_upcast_moe(p, *a, jnp.bfloat16))(x, weights, ids, ew)
    unrounded = jax.jit(lambda *a: _rounded_then_upcast_moe(p, *a, None))(x, weights, ids, ew)
    _assert_closer_to(p, (x, weights, ids, ew), want, unrounded)


def test_down_projection_multiplies_in_its_own_dtype():
    """bf16 tokens with f32 weights, bf16 preferred_element_type (so the up projections multiply in
    bf16), f32 activation and hidden rows: the down projection multiplies f32 rows by the f32 W_down,
    not by W_down rounded to the compute dtype (GPT-OSS in EasyDeL). Tokens and up weights are
    multiples of 1/4 below 2, so the up projections are exact in bf16 (XLA may keep a bf16 result in
    f32 before an upcast: --xla_allow_excess_precision), and only W_down's rounding is visible."""
    p = MoeParams(num_experts=4, k=2, activation="swiglu", projection_dtype="bfloat16",
                  activation_dtype="float32", out_dtype="float32", weights_dtype="float32")
    x, weights, ids, ew = make_inputs(p, t=32, seed=9)
    quarter = lambda a: jnp.clip(jnp.round(a * 4) / 4, -1.75, 1.75)  # noqa: E731
    x = quarter(x).astype(jnp.bfloat16)
    ew = dict(ew, w_in=quarter(ew["w_in"]), w_up=quarter(ew["w_up"]))
    bf = jnp.bfloat16

    def program(x, weights, ids, ew, w_down_dtype):
        mm = lambda v, w: jnp.dot(v.astype(bf), w.astype(bf), preferred_element_type=bf)  # noqa: E731

        def expert(e):
            gate, up = (mm(x, ew[name][e]).astype(jnp.float32) for name in ("w_in", "w_up"))
            wd = ew["w_down"][e].astype(w_down_dtype).astype(jnp.float32)
            return jnp.dot(jax.nn.silu(gate) * up, wd, preferred_element_type=bf)

        return _combined_f32(p, x, weights, ids, expert)

    want = jax.jit(lambda *a: program(*a, jnp.float32))(x, weights, ids, ew)
    rounded_w_down = jax.jit(lambda *a: program(*a, bf))(x, weights, ids, ew)
    _assert_closer_to(p, (x, weights, ids, ew), want, rounded_w_down)


def _assert_closer_to(p: MoeParams, inputs, want, other):
    """Every xla / reference variant gives f32 within a tenth of the gap between `want` and `other`
    (the program without the rounding under test), and that gap is visible."""
    gap = _max_abs_diff(want, other)
    assert gap > 1e-3
    for variant in ("reference", "xla/capacity-pass", "xla/loop-only"):
        got = run(p, variant, *inputs)
        assert got.dtype == jnp.float32
        assert _max_abs_diff(got, want) <= 0.1 * gap, (variant, _max_abs_diff(got, want), gap)


def _max_abs_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def test_biases_with_a_projection_dtype_need_an_activation_dtype():
    with pytest.raises(ValueError, match="needs activation_dtype"):
        MoeParams(num_experts=4, k=2, has_expert_bias=True, projection_dtype="bfloat16")


def test_hidden_dtype_needs_a_projection_dtype():
    with pytest.raises(ValueError, match="hidden_dtype=bfloat16 needs projection_dtype"):
        MoeParams(num_experts=4, k=2, hidden_dtype="bfloat16")


@pytest.mark.parametrize("impl", ["dense", "pallas_tpu"])
def test_one_rounding_kernels_refuse_a_projection_dtype(impl):
    p = MoeParams(num_experts=4, k=2, activation="gelu", projection_dtype="bfloat16")
    x, weights, ids, ew = make_inputs(p, t=8)
    with pytest.raises(ValueError, match="projection_dtype=bfloat16"):
        moe_ffn(x, weights, ids, ew["w_in"], ew["w_down"], p, impl=impl, interpret=True)
