"""The `route` computation on one block of tokens, written for Pallas kernel bodies (TPU and GPU).

A kernel body cannot call `lax.top_k`, gather, or split the expert (lane) axis into groups, so this
module computes the reference's result with what every Pallas backend lowers: elementwise ops,
`where`, reductions over the last axis, and lane indices. The scores and every weight formula are
the reference's own (`reference.score`, `reference.apply_post`), so only selection differs in form:

- top-k is k passes of "largest key, lowest lane among equals", on a total-order integer key of
  the values (`order_key`), which is exactly `lax.top_k`'s order: +NaN > +inf > ... > +0.0 > -0.0
  > ... > -inf > -NaN, ties to the lower index;
- group-limited selection scores each group with masked reductions over its lanes and keeps the
  `topk_group` best groups with the same key and tie rule.

Example (inside a kernel; `lanes((rows, n))` gives int32 lane indices of that shape on the backend)::

    w, ids, s = route_block(logits, bias, None, params, lanes)   # [bt, k], int32 [bt, k], [bt, E]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from .params import RouteParams
from .reference import apply_post, score

Lanes = Callable[[tuple[int, int]], jax.Array]  # int32 lane (last-axis) indices of that shape
INT_MIN = jnp.iinfo(jnp.int32).min


def order_key(x: jax.Array) -> jax.Array:
    """int32 keys whose order is `lax.top_k`'s total order of the float values x."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def top_lane(key: jax.Array, avail: jax.Array, lane: jax.Array, n: int) -> jax.Array:
    """[..., 1] lane of the largest available key (along the last axis, of n lanes), the lowest such lane
    among equals."""
    best = jnp.max(jnp.where(avail, key, INT_MIN), axis=-1, keepdims=True)
    return jnp.min(jnp.where(avail & (key == best), lane, n), axis=-1, keepdims=True)


def _at(x: jax.Array, hit: jax.Array) -> jax.Array:
    """[bt, 1] the value of x [bt | 1, E] at the one lane where hit [bt, E] is true. Taken as the max
    of its bits, not of its value: Triton's float max drops NaN (max(-inf, NaN) = -inf)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    one = jnp.max(jnp.where(hit, bits, INT_MIN), axis=-1, keepdims=True)  # INT_MIN: no int32 is less
    return lax.bitcast_convert_type(one, jnp.float32).astype(x.dtype)


def _sum2(a: jax.Array, b: jax.Array) -> jax.Array:
    """a + b as `jnp.sum` adds two values: low-precision floats are summed in float32."""
    acc = jnp.float32 if jnp.finfo(a.dtype).bits < 32 else a.dtype
    return (a.astype(acc) + b.astype(acc)).astype(a.dtype)


def _group_limit(sel: jax.Array, params: RouteParams, lane: jax.Array) -> jax.Array:
    """sel with the experts outside the topk_group best groups replaced by group_fill."""
    e, g = params.num_experts, params.n_group
    size = e // g
    neg_inf = jnp.asarray(-jnp.inf, sel.dtype)
    member = [(lane >= i * size) & (lane < (i + 1) * size) for i in range(g)]
    scores, key = [], order_key(sel)
    for m in member:
        if params.group_score == "max":
            scores.append(jnp.max(jnp.where(m, sel, neg_inf), axis=-1, keepdims=True))
        else:  # the sum of the group's top two values, as lax.top_k(group, 2) picks them
            first = lane == top_lane(key, m, lane, e)
            second = lane == top_lane(key, m & ~first, lane, e)
            scores.append(_sum2(_at(sel, first), _at(sel, second)))
    keys = [order_key(v) for v in scores]
    taken = [jnp.zeros(keys[0].shape, bool) for _ in range(g)]
    keep = jnp.zeros(sel.shape, bool)
    for _ in range(params.topk_group):
        found = jnp.zeros(keys[0].shape, bool)
        best_key, best = jnp.full(keys[0].shape, INT_MIN), jnp.full(keys[0].shape, -1)
        for i in range(g):  # strictly greater replaces: the lowest group index wins a tie, as lax.top_k
            better = ~taken[i] & (~found | (keys[i] > best_key))
            found = found | ~taken[i]
            best_key, best = jnp.where(better, keys[i], best_key), jnp.where(better, i, best)
        for i in range(g):
            taken[i] = taken[i] | (best == i)
            keep = keep | ((best == i) & member[i])
    return jnp.where(keep, sel, jnp.asarray(params.group_fill, sel.dtype))


def route_block(
    logits: jax.Array,
    bias: jax.Array | None,
    expert_scale: jax.Array | None,
    params: RouteParams,
    lanes: Lanes,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(weights [bt, k], ids int32 [bt, k], scores [bt, E] or None) of logits [bt, E]; bias and
    expert_scale are [1, E] (or None). The same values as `route_reference` on these rows."""
    e, k, bt = params.num_experts, params.k, logits.shape[0]
    lane, slot = lanes((bt, e)), lanes((bt, k))  # full-shape: Mosaic cannot relayout broadcast masks
    s = None
    if params.order == "topk_then_score":
        sel = logits
        if params.expose_scores:
            s = score(logits, params.score)
    else:
        s = score(logits, params.score)
        sel = s + bias if params.selection_bias else s
        if params.n_group > 1:
            sel = _group_limit(sel, params, lane)
    source = sel if params.weights_from == "selection" or params.order == "topk_then_score" else s
    key, avail = order_key(sel), jnp.ones(sel.shape, bool)
    # the k chosen values are collected in float32 (exact for every input dtype): Mosaic cannot
    # select 16-bit values into a lane-broadcast layout
    w = jnp.zeros((bt, k), jnp.float32)
    ids = jnp.zeros((bt, k), jnp.int32)
    scale = None if expert_scale is None else jnp.zeros((bt, k), jnp.float32)
    for j in range(k):
        idx = top_lane(key, avail, lane, e)
        hit = lane == idx
        avail = avail & ~hit
        w = jnp.where(slot == j, _at(source, hit).astype(jnp.float32), w)
        ids = jnp.where(slot == j, idx, ids)
        if scale is not None:
            scale = jnp.where(slot == j, _at(expert_scale, hit).astype(jnp.float32), scale)
    w = w.astype(source.dtype)
    scale = None if scale is None else scale.astype(expert_scale.dtype)
    if params.order == "topk_then_score":
        w = score(w, params.score)
    w = apply_post(w, params, scale if params.uses_expert_scale else None)
    return w, ids, (s if params.expose_scores else None)
