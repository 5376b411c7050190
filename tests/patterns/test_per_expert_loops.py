"""Python loops over experts that keep each expert's weights as arrays of their own (Grok-1, PhiMoE).

The fused `moe` op takes those arrays as they are (`kernels.moe.PerExpert`): every test first checks
with `moefuse.plan` what fused (or that nothing did), then compares `moefuse.jit` with `jax.jit` of
the same program, values and gradients with respect to every array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse
from moefuse.kernels.moe import STACKED_ONLY

T, D, F, E, K = 16, 16, 32, 4, 2


def make_experts(seed=0, num_experts=E):
    """x [T, D], router_w [D, E] and a list of (w_gate, w_up, w_down) per expert."""
    keys = jax.random.split(jax.random.key(seed), 2 + 3 * num_experts)
    x = jax.random.normal(keys[0], (T, D))
    router_w = jax.random.normal(keys[1], (D, num_experts))
    experts = [
        tuple(jax.random.normal(keys[2 + 3 * e + i], shape) * shape[0] ** -0.5
              for i, shape in enumerate(((D, F), (D, F), (F, D))))
        for e in range(num_experts)
    ]
    return x, router_w, experts


def loop_block(arrays_of=lambda e, experts: experts[e], experts_in_loop=None):
    """out = sum over e of weight_e * SwiGLU(x; arrays_of(e)), weight_e = sum(where(ids == e, w, 0), -1)."""

    def block(x, router_w, experts):
        w, ids = lax.top_k(jax.nn.softmax(x @ router_w, axis=-1), K)
        out = jnp.zeros_like(x)
        for e in experts_in_loop or range(len(experts)):
            w_gate, w_up, w_down = arrays_of(e, experts)
            weight = jnp.sum(jnp.where(ids == e, w, 0.0), axis=-1)
            out = out + weight[:, None] * ((jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down)
        return out

    return block


def moe_sites(fn, *args, **kw):
    return [s for s in moefuse.jit(fn, **kw).plan(*args).fused if s.op == "moe"]


def assert_values_and_grads_equal(fn, args, rtol=1e-5, atol=1e-6, **jit_kw):
    """The values and the gradients (w.r.t. every array) of moefuse.jit(fn, **jit_kw) equal jax.jit's:
    the gradient is taken of the fused function, so it runs the fused op's backward."""

    def grad_of(f):
        def loss(*a):
            out = f(*a)
            return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    (_, want), want_g = jax.jit(grad_of(fn))(*args)
    (_, got), got_g = jax.jit(grad_of(moefuse.jit(fn, **jit_kw)))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kernels", [None, {"moe": "xla"}])
def test_per_expert_arrays_fuse_and_give_the_programs_values_and_gradients(kernels):
    """At this size the CPU rows choose dense_gather; the sorted schedule (forced) reads them too."""
    args = make_experts()
    (site,) = moe_sites(loop_block(), *args, kernels=kernels)
    assert site.params["dispatch"] == "loop" and site.params["expert_weights"] == "per_expert"
    assert site.params["num_experts"] == E and site.kernel == ("xla" if kernels else "dense_gather")
    assert_values_and_grads_equal(loop_block(), args, kernels=kernels)


def test_per_expert_arrays_that_are_constants_or_computed_before_the_block():
    """Expert arrays captured as constants (numpy arrays closed over), gate arrays scaled before the block."""
    x, router_w, experts = make_experts(seed=8)
    held = [tuple(np.asarray(a) for a in ex) for ex in experts]

    def constants(x, router_w):
        return loop_block()(x, router_w, [tuple(map(jnp.asarray, ex)) for ex in held])

    def computed(x, router_w, scale):
        return loop_block()(x, router_w, [(jnp.asarray(g) * scale, jnp.asarray(u), jnp.asarray(d))
                                          for g, u, d in held])

    assert len(moe_sites(constants, x, router_w)) == 1
    np.testing.assert_allclose(moefuse.jit(constants)(x, router_w), jax.jit(constants)(x, router_w),
                               rtol=1e-5, atol=1e-6)
    args = (x, router_w, jnp.float32(1.5))
    assert len(moe_sites(computed, *args)) == 1
    assert_values_and_grads_equal(computed, args)


def test_two_experts_reading_one_array_keep_the_programs_meaning():
    """Expert 1's term reads expert 3's arrays while its weight selects ids == 1: the fused op gives
    expert 1 those arrays too (expert 1's own arrays are not read at all, and get zero gradients)."""
    block = loop_block(arrays_of=lambda e, experts: experts[3 if e == 1 else e])
    args = make_experts(seed=1)
    (site,) = moe_sites(block, *args)
    assert site.params["num_experts"] == E
    assert_values_and_grads_equal(block, args)


def test_an_expert_left_out_of_the_loop_contributes_nothing_in_both():
    """Only experts 0..2 of 4 are looped over: the fused op has E = 3 and the tokens routed to expert 3
    get nothing from it, as in the program."""
    block = loop_block(experts_in_loop=range(3))
    args = make_experts(seed=2)
    (site,) = moe_sites(block, *args)
    assert site.params["num_experts"] == 3
    w, ids = lax.top_k(jax.nn.softmax(args[0] @ args[1], axis=-1), K)
    assert (ids == 3).any()
    assert_values_and_grads_equal(block, args)


def test_an_expert_twice_is_declined():
    block = loop_block(experts_in_loop=(0, 1, 2, 3, 2))
    args = make_experts(seed=3)
    assert moe_sites(block, *args) == []
    np.testing.assert_allclose(moefuse.jit(block)(*args), jax.jit(block)(*args), rtol=1e-6)


def test_stacked_gate_up_with_per_expert_down_projections():
    """Each matrix on its own: gate and up sliced from stacked arrays, down projections per expert."""
    x, router_w, experts = make_experts(seed=4)
    stacked = (jnp.stack([ex[0] for ex in experts]), jnp.stack([ex[1] for ex in experts]))
    downs = [ex[2] for ex in experts]

    def block(x, router_w, params):
        (w_gate, w_up), w_down = params
        return loop_block(lambda e, _: (w_gate[e], w_up[e], w_down[e]))(x, router_w, w_down)

    args = (x, router_w, (stacked, downs))
    (site,) = moe_sites(block, *args)
    assert site.params["expert_weights"] == "per_expert"
    assert_values_and_grads_equal(block, args)


@pytest.mark.parametrize("t", [1, 3])
def test_decode_sizes(t):
    x, router_w, experts = make_experts(seed=5)
    args = (x[:t], router_w, experts)
    assert len(moe_sites(loop_block(), *args)) == 1
    assert_values_and_grads_equal(loop_block(), args)


def test_per_expert_arrays_of_another_dtype_are_declined():
    x, router_w, experts = make_experts(seed=7)
    experts[2] = tuple(a.astype(jnp.bfloat16) for a in experts[2])
    assert moe_sites(loop_block(), x, router_w, experts) == []
    np.testing.assert_allclose(moefuse.jit(loop_block())(x, router_w, experts),
                               jax.jit(loop_block())(x, router_w, experts), rtol=1e-6)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_pallas_kernels_decline_per_expert_arrays_and_say_why(platform):
    """On TPU / GPU the Pallas row reads one stacked array: the XLA schedule is chosen, with the reason."""
    (site,) = moe_sites(loop_block(), *make_experts(), platform=platform)
    assert site.kernel == "xla"
    assert any(STACKED_ONLY in reason for reason in site.fallbacks), site.fallbacks
