"""Near misses a review found fused wrongly; each must now be declined (or fused without the wrong part).

Every case is a block that differs from a fusable one in a single detail that changes its values:
weights cast to an integer, a gate or slot weight broadcast along the model dim instead of the
tokens (T == D makes that legal), and a `.set` combine that keeps one of two weights for a repeated
expert. `verify=True` must pass on all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moefuse

T = D = 16
F, E, K = 32, 4, 2
_rng = np.random.default_rng(0)


def _r(*shape, scale=0.3):
    return jnp.asarray(_rng.normal(size=shape) * scale, jnp.float32)


X, WR = _r(T, D, scale=1.0), _r(D, E)
WG, WU, WD = _r(E, D, F), _r(E, D, F), _r(E, F, D)
SG, SU, SD, WSG = _r(D, F), _r(D, F), _r(F, D), _r(D, 1)
W1, W3, W2 = _r(E, F, D), _r(E, F, D), _r(E, D, F)


def _route(x, wr):
    return jax.lax.top_k(jax.nn.softmax(x @ wr, -1), K)


def _experts(x, wg, wu, wd):
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, wg)) * jnp.einsum("td,edf->tef", x, wu)
    return jnp.einsum("tef,efd->ted", h, wd)


def gather_int_weights(x, wr, wg, wu, wd):
    w, ids = _route(x, wr)
    h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, wg[ids])) * jnp.einsum("td,tkdf->tkf", x, wu[ids])
    y = jnp.einsum("tkf,tkfd->tkd", h, wd[ids])
    return jnp.sum(y * (4 * w).astype(jnp.int32)[..., None], axis=1)


def shared_gate_along_d(x, wr, wg, wu, wd, sg, su, sd, wsg):
    w, ids = _route(x, wr)
    combine = jnp.sum(jax.nn.one_hot(ids, E) * w[..., None], 1)
    routed = jnp.einsum("ted,te->td", _experts(x, wg, wu, wd), combine)
    gate = jax.nn.sigmoid(x @ wsg).reshape(1, T)  # [1, T]: broadcasts along d, not t
    return routed + gate * ((jax.nn.silu(x @ sg) * (x @ su)) @ sd)


def slot_weight_along_d(x, wr, w1, w3, w2):
    w, ids = _route(x, wr)
    y = jnp.zeros_like(x)
    for j in range(K):
        e = ids[:, j]
        h = jax.nn.silu(jnp.matmul(w1[e], x[:, :, None])[..., 0]) * jnp.matmul(w3[e], x[:, :, None])[..., 0]
        y = y + w[:, j][None, :] * jnp.matmul(w2[e], h[:, :, None])[..., 0]
    return y


def set_combine_repeated_expert(x, wr, wg, wu, wd):
    w, ids = _route(x, wr)
    ids2 = jnp.concatenate([ids[:, :1], ids[:, :1]], axis=1)  # the same expert in both slots
    c = jnp.zeros((T, E), w.dtype).at[jnp.arange(T)[:, None], ids2].set(w)
    return jnp.einsum("ted,te->td", _experts(x, wg, wu, wd), c)


CASES = {
    "gather_int_weights": (gather_int_weights, (X, WR, WG, WU, WD), "no moe"),
    "shared_gate_along_d": (shared_gate_along_d, (X, WR, WG, WU, WD, SG, SU, SD, WSG), "moe without shared"),
    "slot_weight_along_d": (slot_weight_along_d, (X, WR, W1, W3, W2), "no moe"),
    "set_combine_repeated_expert": (set_combine_repeated_expert, (X, WR, WG, WU, WD), "no moe"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_review_near_miss(name):
    fn, args, want = CASES[name]
    sites = [s for s in moefuse.plan(fn, *args).fused if s.op == "moe"]
    if want == "no moe":
        assert sites == []
    else:
        assert len(sites) == 1 and "shared_expert" not in sites[0].params
    moefuse.jit(fn, verify=True)(*args)
