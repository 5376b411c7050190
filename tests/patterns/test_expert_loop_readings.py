"""Readings of the Python loop over experts that the blind zoos needed, each on its own:

- the loop under an outer `vmap` (the per-expert weight `einsum('sk,sk->s', ids == e, w)` becomes a
  dot_general batched over [B, S]; the zeros the sum starts from become a broadcast of a broadcast);
- the weight summed over k in a transposed layout (`sum(one_hot(ids).transpose(2, 1, 0)[e] * w.T, 0)`);
- the expert's result cast before it is weighted (`(h @ w_down[e]).astype(f32) * w_e`);
- biases per expert (`x @ W_e + b_e`, own vectors or rows of a stacked [E, F]);
- experts that read only their routed tokens (`x * any(ids == e, -1)[:, None]`);
- Llama4's weights on the input, as HF's loop writes them (`FFN_e(x * w_e[:, None])` summed with
  weight 1), with its near misses: ids that may repeat (not a top_k's) and expert biases.

Each test checks with `moefuse.plan` what fused (or that nothing did) and compares `moefuse.jit` with
`jax.jit` of the same program, values and gradients. What each reading must not accept (a token mask
by the first slot only or by another expert's tokens, weights reshaped instead of transposed, a vector
added along the tokens, a vmapped loop started from ones) is in tests/zoo/moe_near_misses.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse

T, D, F, E, K = 16, 16, 32, 4, 2


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale


def make_params(seed=0, num_experts=E):
    """Stacked SwiGLU experts and a router: router [D, E], w_gate and w_up [E, D, F], w_down [E, F, D]."""
    return {
        "router": _normal(seed, (D, num_experts), D**-0.5),
        "w_gate": _normal(seed + 1, (num_experts, D, F), D**-0.5),
        "w_up": _normal(seed + 2, (num_experts, D, F), D**-0.5),
        "w_down": _normal(seed + 3, (num_experts, F, D), F**-0.5),
    }


def swiglu(x, p, e):
    return (jax.nn.silu(x @ p["w_gate"][e]) * (x @ p["w_up"][e])) @ p["w_down"][e]


def moe_sites(fn, *args):
    return [s for s in moefuse.plan(fn, *args).fused if s.op == "moe"]


def assert_values_and_grads_equal(fn, args, rtol=1e-5, atol=1e-6):
    """moefuse.jit(fn) == jax.jit(fn) (verify=True), and the gradients w.r.t. every argument agree."""
    moefuse.jit(fn, verify=True)(*args)

    def loss(f):
        def scalar(*a):
            out = jax.tree_util.tree_leaves(f(*a))[0]
            wave = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
            return jnp.sum(out.astype(jnp.float32) * wave)

        return scalar

    argnums = tuple(range(len(args)))
    want = jax.jit(jax.grad(loss(fn), argnums=argnums))(*args)
    got = jax.jit(jax.grad(loss(moefuse.fuse(fn)), argnums=argnums))(*args)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


# ---- the loop under an outer vmap ---------------------------------------------------------------------


def vmapped_loop():
    """A per-sequence Mixtral loop (weight by einsum of the mask and the weights), vmapped over the batch."""

    def moe_seq(p, h):  # h [S, D]
        rw, sel = lax.top_k(jax.nn.softmax(h @ p["router"], axis=-1), K)
        out = jnp.zeros_like(h)
        for e in range(p["w_gate"].shape[0]):
            w_e = jnp.einsum("sk,sk->s", (sel == e).astype(h.dtype), rw)
            out = out + w_e[:, None] * swiglu(h, p, e)
        return out

    return lambda p, x: jax.vmap(moe_seq, in_axes=(None, 0))(p, x)


def test_a_loop_under_vmap_fuses_with_batched_token_dims():
    """Under vmap the weight einsum is a dot_general batched over [B, S] and contracting k, the matmuls
    read [B, S, D] rows, and the loop starts from zeros broadcast again for the batch ([1, S, D])."""
    p, x = make_params(10), _normal(11, (3, T, D))
    (site,) = moe_sites(vmapped_loop(), p, x)
    assert site.params["dispatch"] == "loop" and site.params["num_experts"] == E and site.params["k"] == K
    assert_values_and_grads_equal(vmapped_loop(), (p, x))


def test_a_batched_weight_contraction_must_batch_every_token_dim_in_order():
    """`einsum('bsk,sbk->bs', mask, w_t)`: w's token dims come in the other order, so its rows are not
    the mask's rows; the loop is not read as one over the same weights (and runs as written)."""
    p, x = make_params(14), _normal(15, (2, T, D))

    def fn(p, x):
        rw, sel = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)  # [B, S, K]
        rw_t = jnp.swapaxes(rw, 0, 1)
        out = jnp.zeros_like(x)
        for e in range(E):
            w_e = jnp.einsum("bsk,sbk->bs", (sel == e).astype(x.dtype), rw_t)
            out = out + w_e[..., None] * swiglu(x, p, e)
        return out

    assert moe_sites(fn, p, x) == []
    np.testing.assert_allclose(moefuse.jit(fn)(p, x), jax.jit(fn)(p, x), rtol=1e-6)


def test_a_term_broadcast_into_a_larger_sum_is_not_an_expert_term():
    """zeros [2, T, D] + sum of [1, T, D] terms: the result repeats the block's output along a new dim,
    which the fused op does not compute."""
    p, x = make_params(16), _normal(17, (T, D))

    def fn(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        out = jnp.zeros((2, T, D))
        for e in range(E):
            w_e = jnp.sum(jnp.where(ids == e, w, 0.0), axis=-1)
            out = out + w_e[None, :, None] * swiglu(x, p, e)[None]
        return out

    plan = moefuse.plan(fn, p, x)
    assert not [s for s in plan.fused if s.op == "moe"]
    (reason,) = [d.reason for d in plan.declined if d.op == "moe"]
    assert reason.startswith("a sum of per-expert terms, but not one term"), reason  # not a build error
    np.testing.assert_allclose(moefuse.jit(fn)(p, x), jax.jit(fn)(p, x), rtol=1e-6)


# ---- the weight in a transposed layout (HF PhiMoE / Mixtral) -------------------------------------------


def transposed_mask_loop():
    """w_e = sum(one_hot(ids).transpose(2, 1, 0)[e] * w.T, axis=0), the HF Mixtral idiom."""

    def fn(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        mask = jax.nn.one_hot(ids, E, dtype=x.dtype).transpose(2, 1, 0)  # [E, K, T]
        out = jnp.zeros_like(x)
        for e in range(E):
            out = out + swiglu(x, p, e) * jnp.sum(mask[e] * w.T, axis=0)[:, None]
        return out

    return fn


def test_the_weight_summed_over_k_in_a_transposed_layout():
    p, x = make_params(20), _normal(21, (T, D))
    (site,) = moe_sites(transposed_mask_loop(), p, x)
    assert site.params["dispatch"] == "loop" and site.params["k"] == K
    assert_values_and_grads_equal(transposed_mask_loop(), (p, x))


def test_the_mask_summed_over_tokens_is_not_a_per_token_weight():
    """sum(mask[e] * w.T, axis=1) sums over the tokens: a [K] vector broadcast over the features."""
    p, x = make_params(24), _normal(25, (K, D))  # K tokens, so the [K] sum lines up with the rows

    def fn(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        mask = jax.nn.one_hot(ids, E, dtype=x.dtype).transpose(2, 1, 0)
        out = jnp.zeros_like(x)
        for e in range(E):
            out = out + swiglu(x, p, e) * jnp.sum(mask[e] * w.T, axis=1)[:, None]
        return out

    assert moe_sites(fn, p, x) == []
    np.testing.assert_allclose(moefuse.jit(fn)(p, x), jax.jit(fn)(p, x), rtol=1e-6)


# ---- the expert's result cast before it is weighted -----------------------------------------------------


# Every op's value in its own dtype: XLA:CPU otherwise keeps some fused bf16 intermediates in float32, so
# the original's values depend on how its ops fuse (tests/kernels/test_route_pallas.py)
ROUNDING_PER_OP = {"xla_allow_excess_precision": False}


def test_a_bf16_expert_result_cast_to_f32_before_its_weight():
    """bf16 experts, f32 weights and sum: `(h @ w_down[e]).astype(f32) * w_e[:, None]`."""
    p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), make_params(30))
    p["router"] = p["router"].astype(jnp.float32)
    x = _normal(31, (T, D)).astype(jnp.bfloat16)

    def fn(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x.astype(jnp.float32) @ p["router"], axis=-1), K)
        out = jnp.zeros(x.shape, jnp.float32)
        for e in range(E):
            w_e = jnp.sum(jnp.where(ids == e, w, 0.0), axis=-1)
            out = out + swiglu(x, p, e).astype(jnp.float32) * w_e[:, None]
        return out

    (site,) = moe_sites(fn, p, x)
    assert site.params["dispatch"] == "loop" and site.params["out_dtype"] == "float32"
    want = jax.jit(fn).lower(p, x).compile(ROUNDING_PER_OP)(p, x)
    got = jax.jit(moefuse.fuse(fn)).lower(p, x).compile(ROUNDING_PER_OP)(p, x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- biases per expert ---------------------------------------------------------------------------------


def biased_loop():
    """GELU MLP experts `gelu(x @ w1_e + b1_e) @ w2_e + b2_e`, arrays of their own per expert."""

    def fn(router, experts, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ router, axis=-1), K)
        out = jnp.zeros_like(x)
        for e, (w1, b1, w2, b2) in enumerate(experts):
            h = x @ w1 + b1
            y = jax.nn.gelu(h, approximate=False) @ w2 + b2
            out = out + y * jnp.sum(w * (ids == e), axis=-1)[:, None]
        return out

    return fn


def make_biased_experts(seed):
    x = _normal(seed, (T, D))
    router = _normal(seed + 1, (D, E), D**-0.5)
    experts = [
        (_normal(seed + 10 + e, (D, F), D**-0.5), _normal(seed + 20 + e, (F,), 0.1),
         _normal(seed + 30 + e, (F, D), F**-0.5), _normal(seed + 40 + e, (D,), 0.1))
        for e in range(E)
    ]
    return router, experts, x


def test_biases_of_experts_kept_as_modules():
    args = make_biased_experts(40)
    (site,) = moe_sites(biased_loop(), *args)
    assert site.params["has_expert_bias"] and site.params["expert_weights"] == "per_expert"
    assert site.params["activation"] == "gelu" and not site.params["gelu_approximate"]
    assert_values_and_grads_equal(biased_loop(), args)


def test_biases_as_rows_of_a_stacked_array():
    """`x @ w1[e] + b1[e]` with b1 [E, F]: the stacked biases, as they are."""
    p, x = make_params(50), _normal(51, (T, D))
    p["b_gate"], p["b_down"] = _normal(52, (E, F), 0.1), _normal(53, (E, D), 0.1)

    def fn(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        out = jnp.zeros_like(x)
        for e in range(E):
            h = jax.nn.silu(x @ p["w_gate"][e] + p["b_gate"][e]) * (x @ p["w_up"][e])
            w_e = jnp.sum(jnp.where(ids == e, w, 0.0), -1)
            out = out + w_e[:, None] * (h @ p["w_down"][e] + p["b_down"][e])
        return out

    (site,) = moe_sites(fn, p, x)
    assert site.params["has_expert_bias"] and "expert_weights" not in site.params
    assert_values_and_grads_equal(fn, (p, x))


# ---- experts that read only their routed tokens ------------------------------------------------------


def masked_input_loop(use_where):
    """Each expert reads x with the rows of the tokens not routed to it zeroed; gate biases [E, F]."""

    def fn(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), K)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        out = jnp.zeros_like(x)
        for e in range(E):
            m = jnp.any(ids == e, axis=-1)
            x_e = jnp.where(m[:, None], x, 0.0) if use_where else x * m[:, None].astype(x.dtype)
            g = x_e @ p["w_gate"][e] + p["b_gate"][e]
            y = (jax.nn.silu(g) * (x_e @ p["w_up"][e])) @ p["w_down"][e]
            out = out + y * jnp.sum(w * (ids == e), axis=-1)[:, None]
        return out

    return fn


@pytest.mark.parametrize("use_where", [False, True], ids=["mul", "where"])
def test_experts_that_read_only_their_routed_tokens(use_where):
    """A token not routed to expert e has weight 0 for it: the zeroed row's FFN (nonzero with biases)
    is multiplied by 0, so the fused op, which reads x and skips the pair, is the same block."""
    p, x = make_params(70), _normal(71, (T, D))
    p["b_gate"] = _normal(72, (E, F), 0.5)
    fn = masked_input_loop(use_where)
    (site,) = moe_sites(fn, p, x)
    assert site.params["dispatch"] == "loop" and site.params["has_expert_bias"]
    assert_values_and_grads_equal(fn, (p, x))


def test_an_expert_no_token_is_routed_to_poisons_the_program_only():
    """The documented difference of a loop (README, deliberate differences), also when each expert
    reads only its routed tokens: expert 3, never chosen, has a NaN weight; the program computes it on
    every token (on zeroed rows here) and multiplies NaN by the weight 0, the fused op skips it."""
    p, x = make_params(90), _normal(91, (T, D))
    never = jnp.asarray([0.0, 0.0, 0.0, -1e9])

    def fn(p, x):
        w, ids = lax.top_k(jax.nn.softmax(x @ p["router"] + never, axis=-1), K)
        out = jnp.zeros_like(x)
        for e in range(E):
            x_e = x * jnp.any(ids == e, axis=-1)[:, None].astype(x.dtype)
            out = out + swiglu(x_e, p, e) * jnp.sum(jnp.where(ids == e, w, 0.0), -1)[:, None]
        return out

    poisoned = dict(p, w_down=p["w_down"].at[3].set(jnp.nan))
    assert len(moe_sites(fn, poisoned, x)) == 1
    assert np.isnan(jax.jit(fn)(poisoned, x)).all()
    np.testing.assert_allclose(moefuse.jit(fn)(poisoned, x), jax.jit(fn)(p, x), rtol=1e-5, atol=1e-6)


# ---- Llama4's weights on the input, in a loop ----------------------------------------------------------


def scaled_input_loop(pick=None, bias=False, dtype=jnp.float32):
    """HF Llama4's loop: each expert on the tokens scaled by their weight for it, outputs summed with
    weight 1 (`pick(logits)` -> (top logits, ids): a top_k by default)."""

    def fn(p, x):
        top, ids = (pick or (lambda v: lax.top_k(v, K)))(x.astype(jnp.float32) @ p["router"])
        s = jax.nn.sigmoid(top)
        out = jnp.zeros(x.shape, jnp.float32)
        for e in range(E):
            s_e = jnp.sum(jnp.where(ids == e, s, 0.0), axis=-1)
            x_e = (x.astype(jnp.float32) * s_e[:, None]).astype(dtype)
            g = x_e @ p["w_gate"][e].astype(dtype)
            if bias:
                g = g + p["b_gate"][e].astype(dtype)
            y = (jax.nn.silu(g) * (x_e @ p["w_up"][e].astype(dtype))) @ p["w_down"][e].astype(dtype)
            out = out + y.astype(jnp.float32)
        return out.astype(x.dtype)

    return fn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_a_loop_of_experts_on_scaled_tokens_is_weights_on_input(dtype):
    """sum_e FFN_e(x * s_e) with s_e = sum_j [ids_j == e] w_j: for a top_k's distinct ids s_e is one
    choice's weight or 0, and FFN_e(0) = 0 without biases, so it is sum_j FFN_{ids_j}(w_j x)."""
    p, x = make_params(100), _normal(101, (T, D)).astype(dtype)
    p["b_gate"] = _normal(102, (E, F), 0.5)
    fn = scaled_input_loop(dtype=dtype)
    (site,) = moe_sites(fn, p, x)
    assert site.params["dispatch"] == "loop" and site.params["weights_on_input"]
    assert not site.params["has_expert_bias"]
    if dtype == jnp.float32:
        assert_values_and_grads_equal(fn, (p, x))
    else:  # bf16 rows: values within the program's own precision, verified against it
        moefuse.jit(fn, verify=True)(p, x)


def test_a_loop_on_scaled_tokens_whose_ids_may_repeat_is_not_read():
    """ids = [argmax, argmax]: a token choosing e twice runs FFN_e once on x * (w_0 + w_1) in the
    program, twice on x * w_j in the fused op (FFN_e is not linear): declined."""

    def twice(v):
        top = jnp.max(v, -1, keepdims=True)
        return jnp.concatenate([top, top], -1), jnp.repeat(jnp.argmax(v, -1)[:, None], K, -1)

    p, x = make_params(110), _normal(111, (T, D))
    fn = scaled_input_loop(pick=twice)
    assert moe_sites(fn, p, x) == []
    assert any("ids that never repeat" in d.reason for d in moefuse.plan(fn, p, x).declined)
    np.testing.assert_allclose(moefuse.jit(fn)(p, x), jax.jit(fn)(p, x), rtol=1e-6)


def test_a_loop_on_scaled_tokens_with_expert_biases_is_not_read():
    """An expert not chosen runs on zero rows: with a bias its FFN_e(0) != 0 is part of the program's
    sum, and the fused op runs only the chosen experts: declined."""
    p, x = make_params(120), _normal(121, (T, D))
    p["b_gate"] = _normal(122, (E, F), 0.5)
    fn = scaled_input_loop(bias=True)
    assert moe_sites(fn, p, x) == []
    assert any("no expert biases" in d.reason for d in moefuse.plan(fn, p, x).declined)
    np.testing.assert_allclose(moefuse.jit(fn)(p, x), jax.jit(fn)(p, x), rtol=1e-6)
