"""The capacity-slot XLA schedule of `moe_ffn`: each expert runs on its C slots of every token group.

For a site that drops tokens (params.capacity set) this is how capacity originals (GShard, Switch,
MaxText) compute: the live assignments are written into a [E, G, C] buffer of rows (slot = position
among the expert's assignments in the group's priority order), every expert runs its FFN on its
G * C slots as one batched matmul chain, and each assignment reads its row back. It does the
capacity's work (E * G * C rows, empty slots included) with no sort, no loop over experts and no
one-hot einsums, so at small shapes on CPU it is faster than the sorted schedule, whose fixed cost
(sorting, the per-expert loop) dominates there; selection uses it only there (the `moe` CPU row for
capacity sites below a work threshold, see `kernels/moe/__init__.py`). The backward is the VJP of
this forward.

Example::

    p = MoeParams(num_experts=4, k=2, capacity=3, capacity_order="token_major")
    out = slots_ffn(x, weights, ids, ew, p)   # what moe_ffn(..., impl="slots") runs; x [T, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .params import MoeParams
from .reference import (
    ExpertWeights,
    capacity_positions,
    cast_expert_weights,
    combine_dtype,
    compute_dtype,
    result_dtype,
    scaled_tokens,
)
from .xla import block_ffn


def slots_ffn(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> jax.Array:
    """out[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t]) over the assignments that get a slot (with
    params.weights_on_input: sum_j FFN_{ids[t, j]}(weights[t, j] * x[t]))."""
    if params.capacity is None:
        raise ValueError("moe_ffn impl='slots' runs capacity slots: it needs params.capacity "
                         "(use impl='xla' for a dropless site)")
    e, c, g = params.num_experts, params.capacity, params.capacity_groups
    t, k = ids.shape
    d = x.shape[1]
    cdt = compute_dtype(params, x)
    wdt = combine_dtype(params, cdt, weights)
    pos = capacity_positions(ids, params)
    live = (ids >= 0) & (ids < e) & (pos < c)
    group = lax.broadcasted_iota(jnp.int32, (t, k), 0) // (t // g)
    dump = e * g * c  # the row every dropped assignment writes to and reads from (never used)
    slot = jnp.where(live, (ids * g + group) * c + pos, dump).reshape(-1)
    if params.weights_on_input:  # each routed row is the token times its weight; outputs summed
        rows = scaled_tokens(x, weights, cdt).reshape(t * k, d)
    else:
        rows = jnp.broadcast_to(x.astype(cdt)[:, None, :], (t, k, d)).reshape(t * k, d)
    buffer = jnp.zeros((dump + 1, d), cdt).at[slot].add(rows)  # live slots are distinct
    y = block_ffn(buffer[:dump].reshape(e, g * c, d), cast_expert_weights(ew, params, cdt), params)
    y = jnp.concatenate([y.reshape(dump, d), jnp.zeros((1, d), y.dtype)])[slot].reshape(t, k, d)
    weighted = y.astype(wdt) if params.weights_on_input else weights.astype(wdt)[..., None] * y.astype(wdt)
    contrib = jnp.where(live[..., None], weighted, jnp.zeros((), wdt))
    return jnp.sum(contrib, axis=1).astype(result_dtype(params, x))
