"""Shared experts join the fused `moe` op only when they are exactly an FFN of the block's tokens added
to the routed output, and nothing else reads their values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moefuse
from moefuse.verify import check_outputs

T, D, F, FS, E, K = 12, 16, 32, 24, 8, 2


def _args(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    n = lambda k, s, fan: jax.random.normal(k, s) * fan**-0.5
    return (
        jax.random.normal(ks[0], (T, D)),
        n(ks[1], (D, E), D),
        n(ks[2], (E, D, F), D),
        n(ks[3], (E, F, D), F),
        {"gate": n(ks[4], (FS, D), D), "up": n(ks[5], (FS, D), D), "down": n(ks[6], (D, FS), FS)},
        n(ks[7], (1, D), D),
    )


def _routed(x, wr, w1, w2):
    w, ids = jax.lax.top_k(jax.nn.softmax(x @ wr, axis=-1), K)
    combine = (jax.nn.one_hot(ids, E) * w[..., None]).sum(1)
    h = jax.nn.gelu(jnp.einsum("td,edf->tef", x, w1))
    return jnp.einsum("ted,te->td", jnp.einsum("tef,efd->ted", h, w2), combine)


def _shared(x, s):  # torch-layout Linear weights [out, in]
    return (jax.nn.silu(x @ s["gate"].T) * (x @ s["up"].T)) @ s["down"].T


def gated_block(x, wr, w1, w2, s, wsg):
    return _routed(x, wr, w1, w2) + jax.nn.sigmoid(x @ wsg.T) * _shared(x, s)


def shared_also_returned(x, wr, w1, w2, s, wsg):
    sh = _shared(x, s)
    return _routed(x, wr, w1, w2) + sh, sh


def shared_of_other_tokens(x, wr, w1, w2, s, wsg):
    return _routed(x, wr, w1, w2) + _shared(2.0 * x, s)


def _moe_site(fn):
    (site,) = [s for s in moefuse.plan(fn, *_args()).fused if s.op == "moe"]
    return site


def test_gated_shared_expert_joins_the_fused_op():
    site = _moe_site(gated_block)
    assert site.params["shared_expert"] == "swiglu" and site.params["shared_gate"] is True
    check_outputs(jax.jit(gated_block)(*_args()), moefuse.jit(gated_block)(*_args()))


@pytest.mark.parametrize("fn", [shared_also_returned, shared_of_other_tokens])
def test_shared_expert_stays_as_written_when_not_exactly_the_blocks(fn):
    site = _moe_site(fn)
    assert "shared_expert" not in site.params
    moefuse.jit(fn, verify=True)(*_args())


def test_grad_through_a_fused_shared_expert():
    loss = lambda fn: lambda *a: (fn(*a) * jnp.cos(jnp.arange(T * D).reshape(T, D))).sum()
    argnums = (0, 2, 3, 4, 5)
    want = jax.jit(jax.grad(loss(gated_block), argnums))(*_args())
    got = jax.jit(jax.grad(loss(moefuse.fuse(gated_block)), argnums))(*_args())
    assert "custom_vjp_call" in str(jax.make_jaxpr(moefuse.fuse(gated_block))(*_args()))
    check_outputs(want, got)
    assert np.abs(np.asarray(got[3]["gate"])).max() > 0  # the shared weights do get gradients
