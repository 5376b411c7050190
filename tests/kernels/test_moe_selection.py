"""Which `moe` implementation the CPU rows choose: a dense original at a small size keeps a dense
schedule (kernels/moe/dense.py); a routed one (spelled by gathering the k experts, sorting ...) at a
small size runs every expert and gathers each assignment's row (kernels/moe/dense_gather.py); larger,
both get the sorted one. A capacity site runs its capacity slots (kernels/moe/slots.py) when they are
few or the size is small."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moefuse
from moefuse import select
from tests.zoo.moe_blocks import make_capacity_gshard_top2

D, F, E, K = 32, 64, 8, 2


def _params(t: int):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, D))
    gate = jax.random.normal(keys[1], (D, E))
    w_in = jax.random.normal(keys[2], (E, D, F)) * D**-0.5
    w_down = jax.random.normal(keys[3], (E, F, D)) * F**-0.5
    return x, gate, w_in, w_down


def _route(x, gate):
    w, i = jax.lax.top_k(jax.nn.softmax(x @ gate, -1), K)
    return w / w.sum(-1, keepdims=True), i


def dense_moe(x, gate, w_in, w_down):
    w, i = _route(x, gate)
    combine = jnp.zeros((x.shape[0], E)).at[jnp.arange(x.shape[0])[:, None], i].set(w)
    hidden = jax.nn.gelu(jnp.einsum("td,edf->tef", x, w_in))
    return jnp.einsum("tef,efd,te->td", hidden, w_down, combine)


def gather_moe(x, gate, w_in, w_down):
    w, i = _route(x, gate)
    hidden = jax.nn.gelu(jnp.einsum("td,tkdf->tkf", x, w_in[i]))
    return jnp.einsum("tkf,tkfd,tk->td", hidden, w_down[i], w)


def _moe_site(fn, args):
    (site,) = [s for s in moefuse.plan(fn, *args).fused if s.op == "moe"]
    return site


@pytest.mark.parametrize("t, kernel", [(16, "dense"), (64, "xla")])  # T*E*D*F = 0.26M, 1.05M
def test_a_dense_original_keeps_a_dense_schedule_while_small(t, kernel):
    args = _params(t)
    site = _moe_site(dense_moe, args)
    assert site.params["dispatch"] == "dense" and site.kernel == kernel
    if kernel == "xla":
        assert any("shape is not in class dispatch dense" in r for r in site.fallbacks), site.fallbacks
    np.testing.assert_allclose(moefuse.jit(dense_moe)(*args), jax.jit(dense_moe)(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, kernel", [(16, "dense_gather"), (127, "dense_gather"), (128, "xla")])
def test_a_gathered_original_runs_dense_gather_while_small(t, kernel):
    """T*E*D*F = 0.26M, 2.08M, 2.10M (the row's bound is 2**21); values and gradients equal the
    original's."""
    args = _params(t)
    site = _moe_site(gather_moe, args)
    assert site.params["dispatch"] == "gather" and site.kernel == kernel
    if kernel == "xla":
        assert any(r.startswith("dense_gather: shape is not in class") for r in site.fallbacks), site
    want = jax.jit(gather_moe)(*args)
    np.testing.assert_allclose(moefuse.jit(gather_moe)(*args), want, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 2, 3))

    for g, w in zip(jax.jit(loss(moefuse.jit(gather_moe)))(*args), jax.jit(loss(gather_moe))(*args)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_dense_gather_keeps_an_unrouted_experts_non_finite_values_out():
    """dense_gather runs every expert on every token, but picks each assignment's own row: an expert no
    token was routed to, whose weights hold inf and nan, reaches neither the output nor the gradients
    of x and the routed experts (the original never computes it), unlike a combine by a [T, E] matrix
    (0 * inf = nan)."""
    x, gate, w_in, w_down = _params(4)
    unrouted = sorted(set(range(E)) - set(np.asarray(_route(x, gate)[1]).ravel().tolist()))
    assert unrouted, "the seed routes 8 assignments to every one of 8 experts: pick another"
    e = unrouted[0]
    w_in = w_in.at[e].set(jnp.inf).at[e, 0, 0].set(jnp.nan)
    args = (x, gate, w_in, w_down)
    assert _moe_site(gather_moe, args).kernel == "dense_gather"
    want = jax.jit(gather_moe)(*args)
    assert np.isfinite(np.asarray(want)).all()
    np.testing.assert_allclose(moefuse.jit(gather_moe)(*args), want, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return jax.grad(lambda x_, w_: jnp.sum(fn(x_, gate, w_, w_down) ** 2), argnums=(0, 1))

    (gx, gw), (wx, ww) = jax.jit(loss(moefuse.jit(gather_moe)))(x, w_in), jax.jit(loss(gather_moe))(x, w_in)
    np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-5)
    routed = [i for i in range(E) if i not in unrouted]
    np.testing.assert_allclose(np.asarray(gw)[routed], np.asarray(ww)[routed], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw[e], 0.0)  # the original's: its weights take part in nothing


def test_the_dense_gradient_equals_the_original():
    args = _params(16)

    def loss(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 2, 3))

    got, want = jax.jit(loss(moefuse.jit(dense_moe)))(*args), jax.jit(loss(dense_moe))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_small_capacity_site_runs_its_capacity_slots():
    """GShard top-2 (G=2 groups of 16 tokens, E=8, C=4: 64 slots for 64 assignments) through the
    slots schedule, equal to the original, values and gradients."""
    case = make_capacity_gshard_top2()
    site = _moe_site(case.fn, case.args)
    assert site.params["capacity"] == 4 and site.kernel == "slots", site
    got, want = moefuse.jit(case.fn)(*case.args), jax.jit(case.fn)(*case.args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a)[0] ** 2), argnums=(0, 2, 3))

    for g, w in zip(jax.jit(loss(moefuse.jit(case.fn)))(*case.args), jax.jit(loss(case.fn))(*case.args)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "t, d, f, capacity, kernel",
    [
        (256, 256, 512, 32, "slots"),  # E*C = T*k: every slot is an assignment's
        (256, 256, 512, 64, "xla"),  # two slots per assignment at E*C*D*F = 2^27: sorting pays
        (32, 32, 64, 32, "slots"),  # four slots per assignment, but E*C*D*F = 2^19: fixed costs rule
    ],
)
def test_capacity_sites_choose_slots_by_slots_per_assignment_and_size(t, d, f, capacity, kernel):
    e, k = 16 if t == 256 else 8, 2
    params = {"num_experts": e, "k": k, "activation": "swiglu", "fused_gate_up": False, "capacity": capacity,
              "capacity_groups": 1, "dispatch": "capacity"}
    sds = jax.ShapeDtypeStruct
    inputs = (sds((t, d), jnp.float32), sds((t, k), jnp.float32), sds((t, k), jnp.int32),
              sds((e, d, f), jnp.float32), sds((e, d, f), jnp.float32), sds((e, f, d), jnp.float32))
    choice = select.choose(select.Request("moe", params, inputs), select.target_for("cpu"))
    assert choice.kernel.impl == kernel, choice


def llama4_dense(x, gate, w_in, w_down):
    """Llama4 as HF writes it: each expert on the tokens scaled by their weight for it, summed."""
    top, ids = jax.lax.top_k(x @ gate, 1)
    rows = jnp.arange(x.shape[0])[:, None]
    scores = jnp.zeros((x.shape[0], E)).at[rows, ids].set(jax.nn.sigmoid(top))
    hidden = jax.nn.gelu(jnp.einsum("etd,edf->etf", x[None] * scores.T[:, :, None], w_in))
    return jnp.einsum("etf,efd->etd", hidden, w_down).sum(0)


def test_weights_on_the_input_run_dense_gather_even_dense_and_small():
    """The dense schedule runs the experts on the tokens as they are: it declines weights_on_input,
    with its reason in the Plan; dense_gather runs them on the scaled rows."""
    args = _params(16)
    site = _moe_site(llama4_dense, args)
    assert site.params["dispatch"] == "dense" and site.params["weights_on_input"]
    assert site.kernel == "dense_gather"
    assert any(r.startswith("dense: runs every expert on the tokens as they are") for r in site.fallbacks)
    np.testing.assert_allclose(moefuse.jit(llama4_dense)(*args), jax.jit(llama4_dense)(*args), rtol=1e-5,
                               atol=1e-5)
