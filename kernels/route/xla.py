"""XLA composite of the fused `route` op: the CPU implementation and the fallback on every platform.

It selects on values computed with exactly the reference's formulas (so expert ids, tie order
included, are bitwise those of the reference) and differs only where that cannot matter: the
group mask is built by comparing the kept group ids with an iota and applied in the grouped
layout (no one-hot, no repeat), a group's top two values are found by two max reductions on
`lax.top_k`'s total-order key (`block.order_key`) rather than by a sort, and nothing is computed
that the outputs do not need. (MaxText DeepSeek routing at T=32 E=8, 4 groups, 2 shared cores, jax
0.12.0.1, 2026-12-08: the fused program went from 0.91-0.93x of the original's time to 0.99-1.00x.)

Example (DeepSeek-V3 without groups: sigmoid, correction bias, renormalised, x2.5)::

    import jax.numpy as jnp
    from moefuse.kernels.route.params import RouteParams
    from moefuse.kernels.route.xla import route_xla

    p = RouteParams(num_experts=16, k=4, score="sigmoid", selection_bias=True,
                    weights_from="scores", post=(("renorm", 1e-20), ("scale", 2.5)))
    weights, ids = route_xla(jnp.zeros((3, 16)), p, bias=jnp.zeros(16))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .block import order_key, top_lane
from .params import RouteParams
from .reference import route_steps


def _keep_best_groups(sel: jax.Array, params: RouteParams) -> jax.Array:
    g = params.n_group
    grouped = sel.reshape(*sel.shape[:-1], g, params.num_experts // g)
    if params.group_score == "top2_sum":
        # lax.top_k(grouped, 2)'s two values, found by two max reductions instead of a sort (XLA:CPU
        # sorts a top_k this small; XLA:TPU runs a bitonic sort), summed as the reference sums them
        key, lane = order_key(grouped), lax.broadcasted_iota(jnp.int32, grouped.shape, grouped.ndim - 1)
        size = grouped.shape[-1]
        first = top_lane(key, jnp.ones(grouped.shape, bool), lane, size)
        second = top_lane(key, lane != first, lane, size)
        top2 = jnp.take_along_axis(grouped, jnp.concatenate([first, second], axis=-1), axis=-1)
        group_scores = jnp.sum(top2, axis=-1)
    else:
        group_scores = jnp.max(grouped, axis=-1)
    _, best = lax.top_k(group_scores, params.topk_group)  # [..., topk_group]
    keep = jnp.any(best[..., :, None] == jnp.arange(g, dtype=best.dtype), axis=-2)  # [..., g]
    return jnp.where(keep[..., None], grouped, jnp.asarray(params.group_fill, sel.dtype)).reshape(sel.shape)


def route_xla(
    logits: jax.Array,
    params: RouteParams,
    bias: jax.Array | None = None,
    expert_scale: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Same contract as `route_reference`: (weights [..., k], ids int32 [..., k][, scores [..., E]])."""
    return route_steps(logits, params, bias, expert_scale, group_limit=_keep_best_groups)
