"""XLA composite of the fused `moe_ffn` op: the CPU implementation and the fallback on every platform.

It does only the routed work. The T*k assignments are sorted by expert (stable), so each expert's
rows are contiguous, and then run in two parts:

1. the *capacity pass*: one batched matmul chain over all E experts with a static capacity C0
   (rows 0..C0-1 of every expert's group; missing rows read a zero row). The weights are the
   stacked arrays themselves, so nothing is copied, and all cores work on it;
2. the *overflow loop*: a `fori_loop` over only the experts with more than C0 rows (a dynamic trip
   count, usually a handful of heavy experts under skewed routing), which slices that expert's
   weights once and runs its remaining rows in blocks: full blocks of the large size (e.g. 64)
   while they fit, then the tail in masked blocks of the small size (e.g. 16). Every dot packs
   its weights again, so big blocks amortise that; the small tail size bounds the padding.

Results are un-permuted with one gather (no scatter) and combined over k. When tokens are few
(T*k < 2E, e.g. decode) the capacity pass is skipped (C0 = 0) and the loop visits only the experts
that received tokens. C0 and the block sizes come from `schedule` (a table keyed by T*k/E); see
benchmarks/moe_cpu.py for the measurements behind it. Everything is static-shaped; no array
constants are captured.

Why not a plain block loop: on XLA:CPU every `dynamic_slice` of an expert's weights inside a loop
is a copy (1.5 MB per expert at D=256, F=512), small dots pack their weights on every call, and
XLA:CPU does not run a while loop concurrently with other work. Measured
on 2 cores (T=256 D=256 F=512 E=64 k=4, f32, Zipf routing; dense all-experts einsum ~110-120 ms):
`lax.ragged_dot` ~305 ms; fori over all padded blocks of 16 with per-block weight slices ~40 ms
(only the used blocks ~32; unpadded blocks ~28); per-expert loop with inner blocks 20-44 ms;
batched matmul over blocks with gathered weights [blocks, D, F] ~70 ms; extra capacity passes over
the top experts with gathered weights 17-36 ms; this schedule ~14-15 ms.

The backward (`backward`) is routed too and follows the same schedule: per block the VJP of the
block FFN, weight gradients accumulated per expert. It equals the VJP of the reference except that
a NaN/inf in an expert a token was not routed to cannot reach the gradients.

Example::

    import jax.numpy as jnp
    from moefuse.kernels.moe.params import MoeParams
    from moefuse.kernels.moe.xla import moe_ffn_xla

    p = MoeParams(num_experts=4, k=2, activation="gelu")
    x, w = jnp.ones((3, 8)), jnp.full((3, 2), 0.5)
    ids = jnp.array([[0, 1], [1, 2], [3, 0]], jnp.int32)
    out = moe_ffn_xla(x, w, ids, jnp.ones((4, 8, 16)) * 0.1, jnp.ones((4, 16, 8)) * 0.1, p)  # [3, 8]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .params import MoeParams
from .reference import (
    ExpertWeights,
    activation,
    combine_dtype,
    compute_dtype,
    expert_weights,
    split_gate_up,
    validate_inputs,
)

# Tile table, keyed by r = T*k / E (the mean number of rows per expert).
#   r < 2:   C0 = 0 (no capacity pass; the loop touches only experts with tokens), blocks of 8 or 16
#   r >= 2:  C0 = 1.5 r rounded up to a multiple of 8 (at most T rounded up; at most the capacity
#            rounded up), overflow blocks by r (largest first, the tail in the last size)
SPARSE_RATIO = 2
OVERFLOW_BLOCKS = ((128, (64, 16)), (math.inf, (128, 32)))  # (r below, block sizes)


def _round_up(v: float, m: int) -> int:
    return int(math.ceil(v / m)) * m


def schedule(
    t: int, k: int, num_experts: int, capacity: int | None = None
) -> tuple[int, tuple[int, ...]]:
    """(C0, block sizes): the capacity pass's rows per expert and the overflow loop's block sizes."""
    n = t * k
    r = n / num_experts
    if r < SPARSE_RATIO:
        return 0, (8 if r <= 1 else 16,)
    c0 = min(_round_up(1.5 * r, 8), _round_up(t, 8))
    if capacity is not None:  # no expert has more than `capacity` live rows
        c0 = min(c0, _round_up(capacity, 8))
    sizes = next(b for bound, b in OVERFLOW_BLOCKS if r < bound)
    return c0, tuple(b for b in sizes if b <= _round_up(n, 8)) or (8,)


class Layout(NamedTuple):
    """Where each assignment's row lives once sorted by expert (flat index p = t * k + j)."""

    live: jax.Array  # [T, k] bool
    order: jax.Array  # [N] int32: sorted row -> p
    starts: jax.Array  # [E + 1] int32: first sorted row of each expert; starts[E] = live rows
    gather_idx: jax.Array  # [T, k] int32: row in concat(capacity table [E*C0], overflow table)


def live_mask(ids: jax.Array, params: MoeParams) -> jax.Array:
    """[T, k] bool: expert in range and not dropped by the capacity (sort-based, no one-hot)."""
    e = params.num_experts
    in_range = (ids >= 0) & (ids < e)
    if params.capacity is None:
        return in_range
    t, k = ids.shape
    g = params.capacity_groups
    key = jnp.where(in_range, ids, e).reshape(g, t // g, k)
    if params.capacity_order == "slot_major":
        key = jnp.swapaxes(key, 1, 2)  # [G, k, T/G]: priority (j, t) within each group
    shape = key.shape
    key = (key + lax.broadcasted_iota(jnp.int32, shape, 0) * (e + 1)).reshape(-1)
    n = key.shape[0]
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    rank = lax.iota(jnp.int32, n) - jnp.searchsorted(sorted_key, sorted_key, side="left").astype(jnp.int32)
    pos = jnp.zeros((n,), jnp.int32).at[order].set(rank).reshape(shape)
    if params.capacity_order == "slot_major":
        pos = jnp.swapaxes(pos, 1, 2)
    return in_range & (pos.reshape(t, k) < params.capacity)


def layout(ids: jax.Array, params: MoeParams, c0: int) -> Layout:
    e = params.num_experts
    t, k = ids.shape
    n = t * k
    live = live_mask(ids, params)
    key = jnp.where(live, ids, e).reshape(-1)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    starts = jnp.searchsorted(key[order], lax.iota(jnp.int32, e + 1), side="left").astype(jnp.int32)
    inv = jnp.zeros((n,), jnp.int32).at[order].set(lax.iota(jnp.int32, n))  # p -> sorted row
    rank = inv - starts[key]
    in_capacity_pass = (key < e) & (rank < c0)
    gather_idx = jnp.where(in_capacity_pass, key * c0 + rank, e * c0 + inv)
    return Layout(live, order, starts, gather_idx.reshape(t, k))


def block_ffn(xb: jax.Array, ew: ExpertWeights, params: MoeParams) -> jax.Array:
    """FFN of G experts on M rows each: xb [G, M, D] with weights [G, ...] -> [G, M, D]."""
    a = jnp.einsum("gmd,gdf->gmf", xb, ew["w_in"])
    if "b_in" in ew:
        a = a + ew["b_in"][:, None, :]
    if params.is_glu:
        if params.fused_gate_up:
            gate, up = split_gate_up(a, params)
        else:
            gate, up = a, jnp.einsum("gmd,gdf->gmf", xb, ew["w_up"])
            if "b_up" in ew:
                up = up + ew["b_up"][:, None, :]
        h = activation(params, gate, up)
    else:
        h = activation(params, a)
    y = jnp.einsum("gmf,gfd->gmd", h, ew["w_down"])
    return y + ew["b_down"][:, None, :] if "b_down" in ew else y


def _capacity_rows(lay: Layout, e: int, c0: int, n: int) -> jax.Array:
    """[E, C0] sorted-row index of each capacity slot; n (a zero row) where the expert has fewer rows."""
    slot = lax.broadcasted_iota(jnp.int32, (e, c0), 1)
    counts = lay.starts[1:] - lay.starts[:-1]
    return jnp.where(slot < counts[:, None], lay.starts[:-1, None] + slot, n)


def _overflow_experts(lay: Layout, c0: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(experts with more than C0 rows first, their number, rows beyond C0 per expert)."""
    over = jnp.maximum(lay.starts[1:] - lay.starts[:-1] - c0, 0)
    eorder = jnp.argsort(over == 0, stable=True).astype(jnp.int32)
    return eorder, jnp.sum(over > 0).astype(jnp.int32), over


def _slice_expert(ew: ExpertWeights, e: jax.Array) -> ExpertWeights:
    return {name: lax.dynamic_slice_in_dim(a, e, 1, axis=0) for name, a in ew.items()}


def _add_at_expert(a: jax.Array, e: jax.Array, v: jax.Array) -> jax.Array:
    """a[e] += v[0] for a [E, ...], v [1, ...] (in place inside the loop)."""
    return lax.dynamic_update_slice_in_dim(a, lax.dynamic_slice_in_dim(a, e, 1, axis=0) + v, e, 0)


def _run_blocks(start, rows, sizes: tuple[int, ...], fn, carry):
    """fn(r, size, keep, carry) over rows [start, start + rows): full blocks of sizes[0] while they
    fit, then of sizes[1] ..., the rest in blocks of sizes[-1] with keep [size, 1] masking the tail
    (keep is None for full blocks). Bigger blocks amortise the per-dot weight packing."""
    done = jnp.zeros((), jnp.int32)
    for size in sizes[:-1]:
        base, count = start + done, (rows - done) // size
        carry = lax.fori_loop(0, count, lambda j, c, b=base, s=size: fn(b + j * s, s, None, c), carry)
        done = done + count * size
    size, base, rest = sizes[-1], start + done, rows - done

    def masked(j, c):
        return fn(base + j * size, size, (j * size + lax.iota(jnp.int32, size) < rest)[:, None], c)

    return lax.fori_loop(0, (rest + size - 1) // size, masked, carry)


def _overflow_forward(xs, ew, lay, params, c0, sizes):
    n_pad, d = xs.shape
    eorder, n_over, over = _overflow_experts(lay, c0)

    def expert(i, ys):
        e = eorder[i]
        w_e = _slice_expert(ew, e)

        def block(r, size, keep, ys):
            yb = block_ffn(lax.dynamic_slice_in_dim(xs, r, size)[None], w_e, params)[0]
            if keep is not None:
                yb = jnp.where(keep, yb, lax.dynamic_slice_in_dim(ys, r, size))
            return lax.dynamic_update_slice_in_dim(ys, yb, r, 0)

        return _run_blocks(lay.starts[e] + c0, over[e], sizes, block, ys)

    return lax.fori_loop(0, n_over, expert, jnp.zeros((n_pad, d), xs.dtype))


def _with_zero_row(v: jax.Array) -> jax.Array:
    """v [R, D] plus one zero row at index R (what padding and empty slots read)."""
    return jnp.concatenate([v, jnp.zeros((1, v.shape[1]), v.dtype)])


def _padded_index(index: jax.Array, pad: int, fill: int) -> jax.Array:
    """index [N] plus `pad` entries `fill`: blocks may read up to `pad` rows past the last row."""
    return jnp.concatenate([index, jnp.full((pad,), fill, index.dtype)])


def _unsort(table_l1: jax.Array | None, table_over: jax.Array, lay: Layout) -> jax.Array:
    """Per-assignment rows [T, k, D] from the capacity-pass table and the overflow table; 0 if not live."""
    parts = [table_over] if table_l1 is None else [table_l1.reshape(-1, table_l1.shape[-1]), table_over]
    v = jnp.concatenate(parts)[lay.gather_idx]
    return jnp.where(lay.live[..., None], v, jnp.zeros((), v.dtype))


class Residuals(NamedTuple):
    x: jax.Array
    weights: jax.Array
    ew: ExpertWeights
    lay: Layout
    y: jax.Array  # [T, k, D] per-assignment expert outputs (0 where not live), compute dtype


def forward(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> tuple[jax.Array, Residuals]:
    """out [T, D] and the residuals for `backward`, on validated inputs."""
    t, d = x.shape
    e, k = params.num_experts, params.k
    n = t * k
    c0, sizes = schedule(t, k, e, params.capacity)
    cdt = compute_dtype(params, x)
    wdt = combine_dtype(params, cdt, weights)
    lay = layout(ids, params, c0)
    ewc = {name: a.astype(cdt) for name, a in ew.items()}
    x0 = _with_zero_row(x.astype(cdt))  # [T + 1, D]
    tok = _padded_index(lay.order // k, max(sizes), t)  # token of each sorted row, then row T
    xs = x0[tok]  # [N + pad, D] sorted by expert
    y1 = block_ffn(x0[tok[_capacity_rows(lay, e, c0, n)]], ewc, params) if c0 else None
    y2 = _overflow_forward(xs, ewc, lay, params, c0, sizes)
    y = _unsort(y1, y2, lay)
    contrib = weights.astype(wdt)[..., None] * y.astype(wdt)
    contrib = jnp.where(lay.live[..., None], contrib, jnp.zeros((), wdt))
    out = jnp.sum(contrib, axis=1).astype(x.dtype)
    return out, Residuals(x, weights, ew, lay, y)


def routed_ffn_xla(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> jax.Array:
    """Same contract as `reference.routed_ffn_reference`."""
    return forward(x, weights, ids, ew, params)[0]


def _overflow_backward(xs, dys, ew, dw, lay, params, c0, sizes):
    n_pad, d = xs.shape
    eorder, n_over, over = _overflow_experts(lay, c0)

    def expert(i, carry):
        dxs, dw = carry
        e = eorder[i]
        w_e = _slice_expert(ew, e)

        def block(r, size, keep, carry):
            dxs, acc = carry
            xb = lax.dynamic_slice_in_dim(xs, r, size)
            dyb = lax.dynamic_slice_in_dim(dys, r, size)
            if keep is not None:  # rows past the expert's end: no gradient, and no NaN * 0 from them
                xb = jnp.where(keep, xb, jnp.zeros((), xb.dtype))
                dyb = jnp.where(keep, dyb, jnp.zeros((), dyb.dtype))
            _, pullback = jax.vjp(lambda v, w: block_ffn(v, w, params), xb[None], w_e)
            dxb, dwb = pullback(dyb[None])
            dxb = dxb[0]
            if keep is not None:
                dxb = jnp.where(keep, dxb, lax.dynamic_slice_in_dim(dxs, r, size))
            return lax.dynamic_update_slice_in_dim(dxs, dxb, r, 0), jax.tree.map(jnp.add, acc, dwb)

        acc0 = jax.tree.map(jnp.zeros_like, w_e)
        dxs, acc = _run_blocks(lay.starts[e] + c0, over[e], sizes, block, (dxs, acc0))
        return dxs, {name: _add_at_expert(a, e, acc[name]) for name, a in dw.items()}

    return lax.fori_loop(0, n_over, expert, (jnp.zeros((n_pad, d), xs.dtype), dw))


def backward(
    res: Residuals, g: jax.Array, params: MoeParams
) -> tuple[jax.Array, jax.Array, ExpertWeights]:
    """(dx, dweights, d expert weights) for the cotangent g [T, D] of `forward`'s output."""
    x, weights, ew, lay, y = res
    t, d = x.shape
    e, k = params.num_experts, params.k
    n = t * k
    c0, sizes = schedule(t, k, e, params.capacity)
    cdt = compute_dtype(params, x)
    wdt = combine_dtype(params, cdt, weights)
    live = lay.live[..., None]
    gw = g.astype(wdt)[:, None, :]
    zero = jnp.zeros((), wdt)
    dweights = jnp.sum(jnp.where(live, gw * y.astype(wdt), zero), axis=-1).astype(weights.dtype)
    dy = jnp.where(live, weights.astype(wdt)[..., None] * gw, zero).astype(cdt)  # [T, k, D]
    ewc = {name: a.astype(cdt) for name, a in ew.items()}
    x0, dy0 = _with_zero_row(x.astype(cdt)), _with_zero_row(dy.reshape(n, d))
    row = _padded_index(lay.order, max(sizes), n)  # assignment of each sorted row, then row N
    tok = jnp.where(row < n, row // k, t)
    xs, dys = x0[tok], dy0[row]
    if c0:
        rows = _capacity_rows(lay, e, c0, n)
        _, pullback = jax.vjp(lambda v, w: block_ffn(v, w, params), x0[tok[rows]], ewc)
        dx1, dw = pullback(dy0[row[rows]])
    else:
        dx1, dw = None, jax.tree.map(jnp.zeros_like, ewc)
    dx2, dw = _overflow_backward(xs, dys, ewc, dw, lay, params, c0, sizes)
    dx = jnp.sum(_unsort(dx1, dx2, lay), axis=1).astype(x.dtype)
    return dx, dweights, {name: dw[name].astype(a.dtype) for name, a in ew.items()}


def moe_ffn_xla(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    w_in: Any,
    w_down: jax.Array,
    params: MoeParams,
    b_in: Any = None,
    b_down: jax.Array | None = None,
) -> jax.Array:
    """Same contract as `reference.moe_ffn_reference` (forward only; `moe_ffn` adds the VJP)."""
    ew = expert_weights(w_in, w_down, b_in, b_down, params)
    validate_inputs(x, weights, ids, ew, params)
    return routed_ffn_xla(x, weights, ids, ew, params)
