"""Unit tests of expert-FFN recognition: activations and labelled expert projections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import moefuse
from moefuse.patterns.activations import _plain_activation, activation_of
from moefuse.patterns.experts import dense_expert_outputs
from moefuse.rewrite import inline_jits
from moefuse.view import View


def _view(fn, *args):
    closed = inline_jits(jax.make_jaxpr(fn)(*args))
    return View(closed), closed.jaxpr.outvars[0]


@pytest.mark.parametrize(
    "fn, name",
    [
        (lambda x: jax.nn.gelu(x, approximate=True), "gelu_tanh"),
        (lambda x: jax.nn.gelu(x, approximate=False), "gelu"),
        (jax.nn.relu, "relu"),
        (jax.nn.silu, "silu"),
        (lambda x: x * jax.nn.sigmoid(x), "silu"),
        # hand-written GELUs: products in other associations, x^3 spelled out, erf instead of erfc
        (lambda x: 0.5 * x * (1.0 + jnp.tanh(0.7978845608 * (x + 0.044715 * x**3))), "gelu_tanh"),
        (lambda x: x * 0.5 * (1 + jnp.tanh((x + 0.044715 * x * x * x) * 0.7978845608)), "gelu_tanh"),
        (lambda x: 0.5 * x * (1.0 + jax.lax.erf(x / 1.4142135623730951)), "gelu"),
        (lambda x: (x * 0.5) * (1.0 + jax.lax.erf(x * 0.7071067811865476)), "gelu"),
        (lambda x: x * jax.nn.sigmoid(1.5957691216 * (x + 0.044715 * x * x * x)), "gelu_tanh"),
    ],
)
def test_plain_activations(fn, name):
    view, out = _view(fn, jnp.ones((4,)))
    got = _plain_activation(view, out)
    assert got is not None and got[0] == name and view.op(got[1]) == "input"


@pytest.mark.parametrize("approximate, name", [(True, "gelu_tanh"), (False, "gelu")])
def test_gelu_in_bfloat16_its_constants_rounded(approximate, name):
    view, out = _view(lambda x: jax.nn.gelu(x, approximate=approximate), jnp.ones((4,), jnp.bfloat16))
    got = _plain_activation(view, out)
    assert got is not None and got[0] == name and view.op(got[1]) == "input"


@pytest.mark.parametrize(
    "fn",
    [
        jnp.tanh,
        lambda x: x * jax.nn.sigmoid(2 * x),
        lambda x: jax.nn.gelu(x) + 1,
        lambda x: jnp.maximum(x, 1),
        # GELU look-alikes: another coefficient, x^2 for x^3, the erf of another value, a third factor
        lambda x: 0.6 * x * (1.0 + jnp.tanh(0.7978845608 * (x + 0.044715 * x**3))),
        lambda x: 0.5 * x * (1.0 + jnp.tanh(0.7978845608 * (x + 0.044715 * x**2))),
        lambda x: 0.5 * x * (1.0 + jax.lax.erf(x / 1.5)),
        lambda x: 0.5 * x * (1.0 + jax.lax.erf(jnp.ones_like(x) / 1.4142135623730951)),
        lambda x: 0.5 * x * x * (1.0 + jax.lax.erf(x / 1.4142135623730951)),
        lambda x: x * jax.nn.sigmoid(0.7978845608 * (x + 0.044715 * x * x * x)),  # sigmoid(z), not (2z)
    ],
)
def test_not_activations(fn):
    view, out = _view(fn, jnp.ones((4,)))
    assert _plain_activation(view, out) is None


def test_gated_activation_binds_gate_and_up():
    view, out = _view(lambda g, u: jax.nn.silu(g) * u, jnp.ones((4,)), jnp.zeros((4,)))
    name, gate, up, params = activation_of(view, out)
    assert name == "swiglu" and gate is view.jaxpr.invars[0] and up is view.jaxpr.invars[1] and params == ()


def _oai(g, u, alpha=1.702, limit=7.0):
    g = jnp.clip(g, max=limit)
    return (jnp.clip(u, -limit, limit) + 1) * (g * jax.nn.sigmoid(g * alpha))


def test_clamped_swiglu_binds_alpha_and_limit():
    view, out = _view(lambda g, u: _oai(g, u, alpha=1.5, limit=3.0), jnp.ones((4,)), jnp.zeros((4,)))
    name, gate, up, params = activation_of(view, out)
    assert (name, gate, up) == ("swiglu_oai", view.jaxpr.invars[0], view.jaxpr.invars[1])
    assert dict(params) == {"swiglu_alpha": 1.5, "swiglu_limit": 3.0}


def _capped(g, limit=7.0):
    return jnp.minimum(g, limit)


@pytest.mark.parametrize(
    "fn",
    [
        lambda g, u: (jnp.clip(u, -7.0, 6.0) + 1) * (_capped(g) * jax.nn.sigmoid(_capped(g) * 1.702)),
        lambda g, u: (jnp.clip(u, -7.0, 7.0) + 1) * (_capped(g) * jax.nn.sigmoid(g * 1.702)),
        lambda g, u: (jnp.clip(u, -7.0, 7.0) + 2) * (_capped(g) * jax.nn.sigmoid(_capped(g) * 1.702)),
        lambda g, u: (jnp.clip(u, -7.0, 7.0) + 1) * (_capped(g, 6.0) * jax.nn.sigmoid(_capped(g, 6.0) * 2)),
    ],
    ids=["asymmetric-clip", "sigmoid-of-unclamped-gate", "plus-two", "gate-cap-not-the-clip-limit"],
)
def test_clamped_swiglu_near_misses(fn):
    view, out = _view(fn, jnp.ones((4,)), jnp.zeros((4,)))
    got = activation_of(view, out)
    assert got is None or got[0] != "swiglu_oai"


@pytest.mark.parametrize(
    "spec_in, spec_out, wd_shape",
    [("td,edf->tef", "tef,efd->ted", (8, 16, 4)), ("td,efd->etf", "etf,edf->ted", (8, 4, 16))],
)
def test_dense_expert_outputs_labels_dims_through_any_einsum(spec_in, spec_out, wd_shape):
    x = jnp.ones((3, 4))
    wg = jnp.ones((8, 4, 16)) if spec_in.startswith("td,edf") else jnp.ones((8, 16, 4))

    def fn(x, wg, wu, wd):
        return jnp.einsum(spec_out, jax.nn.silu(jnp.einsum(spec_in, x, wg)) * jnp.einsum(spec_in, x, wu), wd)

    view, out = _view(fn, x, wg, wg, jnp.ones(wd_shape))
    ffn = dense_expert_outputs(view, out, 8)
    assert ffn is not None and ffn.activation == "swiglu"
    assert ffn.labels == ("T0", "E", "D")
    assert ffn.w_gate_dims == (("E", "D", "F") if spec_in.startswith("td,edf") else ("E", "F", "D"))


def test_dense_expert_outputs_rejects_an_expert_transform_after_the_ffn():
    def fn(x, wg, wd):
        return jnp.tanh(jnp.einsum("tef,efd->ted", jax.nn.relu(jnp.einsum("td,edf->tef", x, wg)), wd))

    view, out = _view(fn, jnp.ones((3, 4)), jnp.ones((8, 4, 16)), jnp.ones((8, 16, 4)))
    assert dense_expert_outputs(view, out, 8) is None


@pytest.mark.slow  # 10-120 s on 2 cores (compiling two ragged_dot programs)
def test_sorted_ragged_dot_reads_torch_layout_weights_through_swapaxes():
    """ragged_dot(rows, swapaxes(w13 [E, 2F, D]), sizes): the fused op takes w13 as it is, gate/up halves."""
    t, d, f, e, k = 16, 8, 12, 4, 2

    def block(x, wr, w13, w2):
        w, ids = jax.lax.top_k(jax.nn.softmax(x @ wr, -1), k)
        flat = ids.reshape(-1)
        perm = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=e)
        g, u = jnp.split(jax.lax.ragged_dot(x[perm // k], jnp.swapaxes(w13, 1, 2), sizes), 2, axis=-1)
        y = jax.lax.ragged_dot(jax.nn.silu(g) * u, jnp.swapaxes(w2, 1, 2), sizes)
        return jnp.einsum("tkd,tk->td", y[jnp.argsort(perm)].reshape(t, k, d), w)

    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    shapes = [(t, d), (d, e), (e, 2 * f, d), (e, d, f)]
    args = [jax.random.normal(key, s) * 0.3 for key, s in zip(ks, shapes, strict=True)]
    (site,) = [s for s in moefuse.plan(block, *args).fused if s.op == "moe"]
    assert site.params["fused_gate_up"] and site.params["gate_up_layout"] == "concat"
    moefuse.jit(block, verify=True)(*args)


def _slot_loop(pairing):
    """A decode-style loop over the k slots; pairing[j] = (weight column, ids column) of slot j."""

    def block(x, wr, w1, w2):
        w, ids = jax.lax.top_k(jax.nn.softmax(x @ wr, -1), 2)
        acc = jnp.zeros_like(x)
        for wj, ij in pairing:
            h = jax.nn.relu(jnp.einsum("tfd,td->tf", w1[ids[:, ij]], x))
            acc = acc + w[:, wj, None] * jnp.einsum("tdf,tf->td", w2[ids[:, ij]], h)
        return acc

    return block


@pytest.mark.parametrize(
    "pairing, fuses",
    [
        # slow tier: the fusing case runs verify (~60 s on 2 cores); the declines stay in the default run
        pytest.param(((0, 0), (1, 1)), True, marks=pytest.mark.slow),
        (((0, 1), (1, 0)), False),
        (((0, 0),), False),
        (((0, 0), (1, 0)), False),
    ],
    ids=["slots", "weights-of-the-other-slot", "first-slot-only", "one-expert-twice"],
)
def test_slot_loop_fuses_only_when_every_slot_pairs_its_own_weight_and_expert(pairing, fuses):
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    shapes = [(6, 8), (8, 4), (4, 16, 8), (4, 8, 16)]
    args = [jax.random.normal(k, s) * 0.5 for k, s in zip(ks, shapes, strict=True)]
    block = _slot_loop(pairing)
    sites = [s for s in moefuse.plan(block, *args).fused if s.op == "moe"]
    assert len(sites) == int(fuses)
    moefuse.jit(block, verify=True)(*args)


def _sorted_block(pad=None, ids_dims=2):
    """A sorted ragged_dot block; pad=(low, high, cut): each ragged_dot reads its rows padded by
    (low, high) zero rows and its result is cut to rows [cut[0]:cut[1]] (MaxText's tile padding);
    ids_dims=3: the router runs on [1, T, D] tokens ([1, T, k] ids)."""
    t, d, f, e, k = 16, 8, 12, 4, 2

    def rd(rows, w, sizes):
        if pad is None:
            return jax.lax.ragged_dot(rows, w, sizes)
        low, high, (start, stop) = pad
        out = jax.lax.ragged_dot(jnp.pad(rows, ((low, high), (0, 0))), w, sizes)
        return out[start:stop]

    def block(x, wr, wg, wu, wd):
        xr = x[None] if ids_dims == 3 else x
        w, ids = jax.lax.top_k(jax.nn.softmax(xr @ wr, -1), k)
        w = w.reshape(t, k)
        flat = ids.reshape(-1)
        perm = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=e)
        rows = x[perm // k]
        y = rd(jax.nn.silu(rd(rows, wg, sizes)) * rd(rows, wu, sizes), wd, sizes)
        return jnp.einsum("tkd,tk->td", y[jnp.argsort(perm)].reshape(t, k, d), w)

    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    shapes = [(t, d), (d, e), (e, d, f), (e, d, f), (e, f, d)]
    return block, [jax.random.normal(key, s) * 0.3 for key, s in zip(ks, shapes, strict=True)]


@pytest.mark.parametrize(
    "pad, fuses",
    [
        ((0, 16, (0, 32)), True),  # zero rows appended, the first len(rows) rows kept
        ((16, 0, (16, 48)), False),  # rows prepended: they take the first group's place
        ((0, 16, (0, 16)), False),  # cut to fewer rows than were sorted
    ],
    ids=["appended", "prepended", "cut-short"],
)
def test_ragged_dot_of_padded_rows_cut_back_is_the_ragged_dot_of_the_rows(pad, fuses):
    block, args = _sorted_block(pad)
    plan = moefuse.plan(block, *args)
    assert [s.op for s in plan.fused if s.op == "moe"] == (["moe"] if fuses else []), str(plan)


def test_sorted_dispatch_reads_ids_with_several_token_dims():
    """[1, T, k] ids flattened for the sort (a [B, S, D] model at batch 1) are the ids of T tokens."""
    block, args = _sorted_block(ids_dims=3)
    plan = moefuse.plan(block, *args)
    assert [s.op for s in plan.fused] == ["route", "moe"], str(plan)
