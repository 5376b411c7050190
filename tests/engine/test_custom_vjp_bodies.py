"""custom_vjp calls are matched through their primal bodies, and replaced whole or not at all.

MaxText and EasyDeL permute tokens with a `custom_vjp` gather (`sort_activations`): matching sees the
gather inside, the region takes the call whole, and the Plan names the custom rule it replaces.
A call whose body only partly belongs to a match is not cut: the site declines or takes all of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import moefuse

T, D, F, E, K = 16, 32, 64, 8, 2


@jax.custom_vjp
def sort_rows(x, order):
    return x[order]


def _sort_fwd(x, order):
    return x[order], (order, x.shape[0])


def _sort_bwd(res, g):
    order, n = res
    return jnp.zeros((n, g.shape[1]), g.dtype).at[order].add(g), None


sort_rows.defvjp(_sort_fwd, _sort_bwd)


def sorted_moe(x, w_router, w_gate, w_up, w_down):
    probs = jax.nn.softmax(x @ w_router, axis=-1)
    weights, ids = jax.lax.top_k(probs, K)
    weights = weights / weights.sum(-1, keepdims=True)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat)
    rows = sort_rows(x, order // K)
    sizes = jnp.bincount(flat, length=E)
    h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes)) * jax.lax.ragged_dot(rows, w_up, sizes)
    out = jax.lax.ragged_dot(h, w_down, sizes)
    unsorted = sort_rows(out, jnp.argsort(order)).reshape(T, K, D)
    return jnp.einsum("tkd,tk->td", unsorted, weights)


def _args():
    ks = jax.random.split(jax.random.PRNGKey(7), 5)
    return (
        jax.random.normal(ks[0], (T, D)),
        jax.random.normal(ks[1], (D, E)) * 0.3,
        jax.random.normal(ks[2], (E, D, F)) * D**-0.5,
        jax.random.normal(ks[3], (E, D, F)) * D**-0.5,
        jax.random.normal(ks[4], (E, F, D)) * F**-0.5,
    )


def test_a_sorted_block_permuted_by_custom_vjp_gathers_fuses_and_names_the_rule():
    args = _args()
    plan = moefuse.plan(sorted_moe, *args)
    ops = sorted(s.op for s in plan.fused)
    assert ops == ["moe", "route"], str(plan)
    (moe,) = [s for s in plan.fused if s.op == "moe"]
    assert moe.params["replaces_custom_vjp"] == ["_sort_bwd"]
    got, want = moefuse.jit(sorted_moe)(*args), jax.jit(sorted_moe)(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    g_got = jax.grad(lambda *a: moefuse.fuse(sorted_moe)(*a).sum(), argnums=(0, 2, 4))(*args)
    g_want = jax.grad(lambda *a: sorted_moe(*a).sum(), argnums=(0, 2, 4))(*args)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_a_custom_vjp_outside_any_match_keeps_its_rule():
    """The custom rule here is deliberately not the derivative: it must survive the pass."""

    @jax.custom_vjp
    def straight_through(x):
        return jnp.round(x)

    straight_through.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))

    def fn(x, w):
        probs = jax.nn.softmax(straight_through(x) @ w, -1)
        v, i = jax.lax.top_k(probs, 2)
        return v / v.sum(-1, keepdims=True), i

    x, w = (
        jax.random.normal(jax.random.PRNGKey(0), (8, 16)) * 3,
        jax.random.normal(jax.random.PRNGKey(1), (16, 4)),
    )
    assert [s.op for s in moefuse.plan(fn, x, w).fused] == ["route"]
    # the first weight of each token (renormalised weights sum to 1, so their sum has no gradient)
    g_got = jax.grad(lambda x: moefuse.fuse(fn)(x, w)[0][:, 0].sum())(x)
    g_want = jax.grad(lambda x: fn(x, w)[0][:, 0].sum())(x)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g_want).max()) > 0  # the straight-through rule is what gives a gradient here
