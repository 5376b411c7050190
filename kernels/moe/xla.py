"""XLA composite of the fused `moe_ffn` op: the CPU implementation and the fallback on every platform.

It does only the routed work. The T*k assignments are sorted by expert (stable), so each expert's
rows are contiguous, and then run in two parts:

1. the *capacity pass* (when it runs): one batched matmul chain over all E experts with a static
   capacity C0 (rows 0..C0-1 of every expert's group; missing rows read a zero row). The weights are
   the stacked arrays themselves, so nothing is copied, and all cores work on it;
2. the *loop*: a `fori_loop` over only the experts with rows beyond C0 (a dynamic trip count), which
   slices that expert's weights once and runs its remaining rows in masked blocks of powers of two
   (largest first, a block partly padding when that saves a block: `block_counts`). Every dot packs
   its weights again, so few big blocks beat many small ones.

Expert weights given as E separate arrays (`reference.PerExpert`) are read where they are: the loop
picks expert e's arrays with a `lax.switch` on e, and the capacity pass never runs for them (C0 = 0;
its batched matmul would need them stacked, a copy of every expert's weights on every call).

Whether the capacity pass runs is decided at run time from the expert loads (`use_capacity_pass`, a
cost model in units of one row's FFN): it reads every expert's weights, which pays when most experts
have rows (balanced routing) and is wasted when a few hot experts hold most rows (skewed routing),
where the loop alone visits only the experts that have rows. Results are un-permuted with one gather
(no scatter) and combined over k. With params.weights_on_input the sorted rows are each assignment's
token times its weight (`reference.scaled_tokens`) and the combine is an unweighted sum. When tokens
are few (T*k < 2E, e.g. decode) there is no capacity pass (C0 = 0). C0 and the blocks come from
`schedule`. Everything is static-shaped; no array constants are captured.

Why not a plain block loop: on XLA:CPU every `dynamic_slice` of an expert's weights inside a loop
is a copy (1.5 MB per expert at D=256, F=512), small dots pack their weights on every call, and
XLA:CPU does not run a while loop concurrently with other work. Measured
on 2 cores (T=256 D=256 F=512 E=64 k=4, f32, Zipf routing; dense all-experts einsum ~110-120 ms):
`lax.ragged_dot` ~305 ms; fori over all padded blocks of 16 with per-block weight slices ~40 ms
(only the used blocks ~32; unpadded blocks ~28); per-expert loop with inner blocks 20-44 ms;
batched matmul over blocks with gathered weights [blocks, D, F] ~70 ms; extra capacity passes over
the top experts with gathered weights 17-36 ms; capacity pass always (C0 = 1.5 T*k/E) plus an
overflow loop in blocks of 64 then 16: ~14-15 ms.
Per piece (same shapes): the capacity pass costs ~0.17 ms per expert (reading its weights; batched
dots with M <= 32 reach about half the memory bandwidth) plus ~6.5 us per row; one loop block of M
rows ~0.3 ms + ~6.3 us per row, an extra block of the same expert ~0.1-0.18 ms, the weight slice
~0.05 ms. With the always-on capacity pass, the spelling benchmark's skewed router (E=32 k=2: 4
experts hold every row; E=64 k=4: 19 experts have rows, 4 hold 90%) ran the kernel at ~6-7x the
dense einsum and 2.1-2.7x slower than the loop alone, which reads only the used experts' weights (now
chosen there: ~15-19x). On balanced loads (uniform Zipf s=0) the capacity pass is ~8-17% faster than
the loop alone and is kept; at Zipf s=1 the two are within ~10% either way. Loop blocks 256, 64, 16
vs blocks of 64 then 16 (loop only, skewed router): the same at E=32 k=2, ~5% faster at E=64 k=4;
every power of two 256 ... 16 about the same again, with two more loop bodies to compile (the
backward's compile time grows with every block size); adding blocks of 8 (for experts with a few
rows): ~15% faster at E=64 k=4 under moe_cpu's Zipf s=2 (51 experts have rows, a long tail), within
noise at E=32. These were measured on a shared machine (load from other jobs): differences under
~10% are not resolved.

The backward (`backward`) is routed too and follows the same schedule: per block the VJP of the
block FFN, weight gradients accumulated per expert. It equals the VJP of the reference except that
a NaN/inf in an expert a token was not routed to cannot reach the gradients. Per-expert arrays get
one gradient array each (accumulated in a stacked buffer, split at the end).

Example::

    import jax.numpy as jnp
    from moefuse.kernels.moe.params import MoeParams
    from moefuse.kernels.moe import moe_ffn

    p = MoeParams(num_experts=4, k=2, activation="gelu")
    x, w = jnp.ones((3, 8)), jnp.full((3, 2), 0.5)
    ids = jnp.array([[0, 1], [1, 2], [3, 0]], jnp.int32)
    out = moe_ffn(x, w, ids, jnp.ones((4, 8, 16)) * 0.1, jnp.ones((4, 16, 8)) * 0.1, p, impl="xla")  # [3, 8]
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
    PerExpert,
    activation,
    cast_expert_weights,
    combine_assignments,
    combine_dtype,
    compute_dtype,
    has_per_expert,
    hidden_rows,
    output_dtype,
    project,
    scaled_tokens,
    scaled_tokens_vjp,
    split_gate_up,
)

# Schedule table (see benchmarks/moe_cpu.py for the measurements behind it), keyed by r = T*k / E:
#   r < 2:   C0 = 0 (no capacity pass; the loop touches only experts with tokens)
#   r >= 2:  C0 = 1.5 r rounded up to a multiple of 8 (at most T rounded up; at most the capacity
#            rounded up); whether the capacity pass runs is decided at run time by `use_capacity_pass`
# Loop blocks: MAX_BLOCK (or the most rows one expert can have, rounded up to a power of two), a quarter
# of it, ... down to 8 (every block size compiles its own loop body, forward and VJP).
SPARSE_RATIO = 2
MAX_BLOCK = 256
# Cost model of the run-time choice, in units of one row's expert FFN (measured on XLA:CPU: a row is
# ~6 us at D=256 F=512 f32 on 2 cores; reading an expert's weights ~0.15-0.3 ms, i.e. tens of rows).
CAPACITY_EXPERT_COST = 30  # the capacity pass reads every expert's weights once
LOOP_EXPERT_COST = 20  # the loop visits an expert: weight slice, loop overhead
BLOCK_COST = 25  # every block's dots read (pack) that expert's weights again


class Schedule(NamedTuple):
    """Static part of the schedule: the capacity pass's rows per expert (0: never) and the loop's blocks."""

    c0: int
    blocks: tuple[int, ...]  # largest first


def _round_up(v: float, m: int) -> int:
    return int(math.ceil(v / m)) * m


def _pow2_at_least(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def schedule(t: int, k: int, num_experts: int, capacity: int | None = None) -> Schedule:
    """(C0, block sizes): the capacity pass's rows per expert and the per-expert loop's block sizes."""
    n = t * k
    r = n / num_experts
    most = n if capacity is None else min(n, capacity)  # most rows one expert can have
    smallest = 8
    largest = max(min(MAX_BLOCK, _pow2_at_least(most)), smallest)
    blocks = tuple(largest >> i for i in range(0, largest.bit_length(), 2) if largest >> i > smallest)
    blocks += (smallest,)
    if r < SPARSE_RATIO:
        return Schedule(0, blocks)
    c0 = min(_round_up(1.5 * r, 8), _round_up(t, 8))
    if capacity is not None:  # no expert has more than `capacity` live rows
        c0 = min(c0, _round_up(capacity, 8))
    return Schedule(c0, blocks)


def expert_schedule(t: int, params: MoeParams, ew: ExpertWeights) -> Schedule:
    """`schedule` for these expert weights: no capacity pass (C0 = 0) when any is given per expert, since
    its batched matmul reads one stacked array and would have to stack the per-expert ones on every call."""
    sched = schedule(t, params.k, params.num_experts, params.capacity)
    return sched._replace(c0=0) if has_per_expert(ew) else sched


def block_counts(rows: jax.Array, blocks: tuple[int, ...]) -> list[jax.Array]:
    """How many blocks of each size the loop runs for `rows` rows (elementwise): largest first, and a
    block may be partly padding (less than half of it, at most 2 BLOCK_COST rows) when that saves blocks."""
    counts, rest = [], rows
    for size in blocks[:-1]:
        count = (rest + min(size // 2 - 1, 2 * BLOCK_COST)) // size
        counts.append(count)
        rest = jnp.maximum(rest - count * size, 0)
    counts.append((rest + blocks[-1] - 1) // blocks[-1])
    return counts


def _loop_cost(rows: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
    """Modelled cost of the loop over experts with rows [E] (0: not visited)."""
    per_size = [c * (BLOCK_COST + s) for c, s in zip(block_counts(rows, blocks), blocks)]
    return jnp.sum(jnp.where(rows > 0, LOOP_EXPERT_COST + sum(per_size), 0))


def use_capacity_pass(counts: jax.Array, sched: Schedule) -> jax.Array:
    """Bool scalar: whether the capacity pass (C0 rows of every expert) plus the loop over the rest
    is modelled cheaper than the loop over every expert with rows, for per-expert row counts [E]."""
    if not sched.c0:
        return jnp.zeros((), bool)
    e = counts.shape[0]
    with_pass = e * (CAPACITY_EXPERT_COST + sched.c0) + _loop_cost(jnp.maximum(counts - sched.c0, 0),
                                                                     sched.blocks)
    return with_pass < _loop_cost(counts, sched.blocks)


class Layout(NamedTuple):
    """Where each assignment's row lives once sorted by expert (flat index p = t * k + j)."""

    live: jax.Array  # [T, k] bool
    order: jax.Array  # [N] int32: sorted row -> p
    starts: jax.Array  # [E + 1] int32: first sorted row of each expert; starts[E] = live rows
    c0: jax.Array  # int32 scalar: rows per expert the capacity pass runs (Schedule.c0, or 0: skipped)
    gather_idx: jax.Array  # [T, k] int32: row in concat(capacity table [E*C0], loop table)


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


def layout(ids: jax.Array, params: MoeParams, sched: Schedule) -> Layout:
    """Sort the live assignments by expert and decide (from the loads) whether the capacity pass runs."""
    e = params.num_experts
    t, k = ids.shape
    n = t * k
    live = live_mask(ids, params)
    key = jnp.where(live, ids, e).reshape(-1)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    starts = jnp.searchsorted(key[order], lax.iota(jnp.int32, e + 1), side="left").astype(jnp.int32)
    c0 = jnp.where(use_capacity_pass(starts[1:] - starts[:-1], sched), sched.c0, 0).astype(jnp.int32)
    inv = jnp.zeros((n,), jnp.int32).at[order].set(lax.iota(jnp.int32, n))  # p -> sorted row
    rank = inv - starts[key]
    in_capacity_pass = (key < e) & (rank < c0)
    gather_idx = jnp.where(in_capacity_pass, key * sched.c0 + rank, e * sched.c0 + inv)
    return Layout(live, order, starts, c0, gather_idx.reshape(t, k))


def block_ffn(xb: jax.Array, ew: ExpertWeights, params: MoeParams) -> jax.Array:
    """FFN of G experts on M rows each: xb [G, M, D] with weights [G, ...] -> [G, M, D]."""
    a = project("gmd,gdf->gmf", xb, ew["w_in"], params)
    if "b_in" in ew:
        a = a + ew["b_in"][:, None, :]
    if params.is_glu:
        if params.fused_gate_up:
            gate, up = split_gate_up(a, params)
        else:
            gate, up = a, project("gmd,gdf->gmf", xb, ew["w_up"], params)
            if "b_up" in ew:
                up = up + ew["b_up"][:, None, :]
        h = activation(params, gate, up)
    else:
        h = activation(params, a)
    h = hidden_rows(h, params)
    y = project("gmf,gfd->gmd", h, ew["w_down"], params)
    return y + ew["b_down"][:, None, :] if "b_down" in ew else y


def _capacity_rows(lay: Layout, e: int, c0: int, n: int) -> jax.Array:
    """[E, C0] sorted-row index of each capacity slot; n (a zero row) where the expert has fewer rows."""
    slot = lax.broadcasted_iota(jnp.int32, (e, c0), 1)
    counts = lay.starts[1:] - lay.starts[:-1]
    return jnp.where(slot < counts[:, None], lay.starts[:-1, None] + slot, n)


def _loop_experts(lay: Layout) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(experts with rows beyond C0 first, their number, rows beyond C0 per expert)."""
    over = jnp.maximum(lay.starts[1:] - lay.starts[:-1] - lay.c0, 0)
    eorder = jnp.argsort(over == 0, stable=True).astype(jnp.int32)
    return eorder, jnp.sum(over > 0).astype(jnp.int32), over


def _slice_expert(ew: ExpertWeights, e: jax.Array) -> dict[str, jax.Array]:
    """Expert e's weights, each [1, ...]: a dynamic slice of a stacked array; for per-expert arrays
    (`PerExpert`) one `lax.switch` on e over the experts picks each name's e-th array."""
    out = {name: lax.dynamic_slice_in_dim(a, e, 1, axis=0) for name, a in ew.items()
           if not isinstance(a, PerExpert)}
    separate = {name: a.arrays for name, a in ew.items() if isinstance(a, PerExpert)}
    if separate:
        count = len(next(iter(separate.values())))
        branches = [lambda i=i: {name: arrays[i][None] for name, arrays in separate.items()}
                    for i in range(count)]
        out |= lax.switch(e, branches)
    return out


def _as_given(grad: jax.Array, a: Any) -> Any:
    """A stacked gradient [E, ...] in the form and dtype of the expert array `a` it is for."""
    if isinstance(a, PerExpert):
        return PerExpert(tuple(grad[i].astype(v.dtype) for i, v in enumerate(a.arrays)))
    return grad.astype(a.dtype)


def _add_at_expert(a: jax.Array, e: jax.Array, v: jax.Array) -> jax.Array:
    """a[e] += v[0] for a [E, ...], v [1, ...] (in place inside the loop)."""
    return lax.dynamic_update_slice_in_dim(a, lax.dynamic_slice_in_dim(a, e, 1, axis=0) + v, e, 0)


def _run_blocks(start, rows, sizes: tuple[int, ...], fn, carry):
    """fn(r, size, keep, carry) over rows [start, start + rows) in the blocks of `block_counts`, keep
    [size, 1] masking rows past the end. Bigger blocks amortise the per-dot weight packing."""
    done = jnp.zeros((), jnp.int32)
    for size, count in zip(sizes, block_counts(rows, sizes)):
        def block(j, c, base=done, size=size):
            off = base + j * size
            return fn(start + off, size, (off + lax.iota(jnp.int32, size) < rows)[:, None], c)

        carry = lax.fori_loop(0, count, block, carry)
        done = done + count * size
    return carry


def _loop_forward(xs, ew, lay, params, sizes):
    n_pad, d = xs.shape
    eorder, n_over, over = _loop_experts(lay)

    def expert(i, ys):
        e = eorder[i]
        w_e = _slice_expert(ew, e)

        def block(r, size, keep, ys):
            yb = block_ffn(lax.dynamic_slice_in_dim(xs, r, size)[None], w_e, params)[0]
            yb = jnp.where(keep, yb, lax.dynamic_slice_in_dim(ys, r, size))
            return lax.dynamic_update_slice_in_dim(ys, yb, r, 0)

        return _run_blocks(lay.starts[e] + lay.c0, over[e], sizes, block, ys)

    odt = output_dtype(params, xs.dtype)
    return lax.fori_loop(0, n_over, expert, _zeros((n_pad, d), odt, (xs, ew)))


def _zeros(shape: tuple[int, ...], dtype: Any, refs: Any) -> jax.Array:
    """Zeros that vary over the same manual mesh axes as the arrays `refs` together (inside a
    `shard_map`, loop carries and cond branches must agree in that type; outside one it is just zeros)."""
    scalar = sum(jnp.zeros_like(r, shape=(), dtype=dtype) for r in jax.tree.leaves(refs))
    return jnp.broadcast_to(scalar, shape)


def _with_zero_row(v: jax.Array) -> jax.Array:
    """v [R, D] plus one zero row at index R (what padding and empty slots read)."""
    return jnp.concatenate([v, jnp.zeros((1, v.shape[1]), v.dtype)])


def _padded_index(index: jax.Array, pad: int, fill: int) -> jax.Array:
    """index [N] plus `pad` entries `fill`: blocks may read up to `pad` rows past the last row."""
    return jnp.concatenate([index, jnp.full((pad,), fill, index.dtype)])


def _routed_rows(
    x: jax.Array, weights: jax.Array, order: jax.Array, params: MoeParams, cdt: Any, pad: int
) -> tuple[jax.Array, jax.Array]:
    """(source rows with a zero row last, the source row of each sorted row and then `pad` more that
    read the zero row): the tokens at order // k, or with params.weights_on_input each assignment's
    scaled row (`scaled_tokens`) at order."""
    t, d = x.shape
    if params.weights_on_input:
        v = scaled_tokens(x, weights, cdt).reshape(-1, d)
        return _with_zero_row(v), _padded_index(order, pad, v.shape[0])
    return _with_zero_row(x.astype(cdt)), _padded_index(order // params.k, pad, t)


def _unsort(table_l1: jax.Array | None, table_over: jax.Array, lay: Layout) -> jax.Array:
    """Per-assignment rows [T, k, D] from the capacity-pass table and the loop table; 0 if not live."""
    parts = [table_over] if table_l1 is None else [table_l1.reshape(-1, table_l1.shape[-1]), table_over]
    v = jnp.concatenate(parts)[lay.gather_idx]
    return jnp.where(lay.live[..., None], v, jnp.zeros((), v.dtype))


class Residuals(NamedTuple):
    x: jax.Array
    weights: jax.Array
    ew: ExpertWeights
    lay: Layout
    y: jax.Array | None  # [T, k, D] per-assignment expert outputs (0 where not live), in output_dtype;
    # None with weights_on_input (the weights' gradient is read from the rows' then)


def forward(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> tuple[jax.Array, Residuals]:
    """out [T, D] and the residuals for `backward`, on validated inputs."""
    t, d = x.shape
    e, k = params.num_experts, params.k
    n = t * k
    sched = expert_schedule(t, params, ew)
    c0 = sched.c0
    cdt = compute_dtype(params, x)
    lay = layout(ids, params, sched)
    ewc = cast_expert_weights(ew, params, cdt)
    src, idx = _routed_rows(x, weights, lay.order, params, cdt, max(sched.blocks))
    y1 = None
    if c0:
        y1 = lax.cond(lay.c0 > 0,
                      lambda: block_ffn(src[idx[_capacity_rows(lay, e, c0, n)]], ewc, params),
                      lambda: _zeros((e, c0, d), output_dtype(params, cdt), (src, ewc)))
    y2 = _loop_forward(src[idx], ewc, lay, params, sched.blocks)
    y = _unsort(y1, y2, lay)
    out = combine_assignments(x, weights, y, lay.live, params)
    return out, Residuals(x, weights, ew, lay, None if params.weights_on_input else y)


def _loop_backward(xs, dys, ew, dw, lay, params, sizes):
    n_pad, d = xs.shape
    eorder, n_over, over = _loop_experts(lay)

    def expert(i, carry):
        dxs, dw = carry
        e = eorder[i]
        w_e = _slice_expert(ew, e)

        def block(r, size, keep, carry):
            dxs, acc = carry
            # rows past the expert's end: no gradient, and no NaN * 0 from them
            xb = jnp.where(keep, lax.dynamic_slice_in_dim(xs, r, size), jnp.zeros((), xs.dtype))
            dyb = jnp.where(keep, lax.dynamic_slice_in_dim(dys, r, size), jnp.zeros((), dys.dtype))
            _, pullback = jax.vjp(lambda v, w: block_ffn(v, w, params), xb[None], w_e)
            dxb, dwb = pullback(dyb[None])
            dxb = jnp.where(keep, dxb[0], lax.dynamic_slice_in_dim(dxs, r, size))
            return lax.dynamic_update_slice_in_dim(dxs, dxb, r, 0), jax.tree.map(jnp.add, acc, dwb)

        acc0 = jax.tree.map(lambda a: _zeros(a.shape, a.dtype, (xs, dys, w_e)), w_e)
        dxs, acc = _run_blocks(lay.starts[e] + lay.c0, over[e], sizes, block, (dxs, acc0))
        return dxs, {name: _add_at_expert(a, e, acc[name]) for name, a in dw.items()}

    return lax.fori_loop(0, n_over, expert, (_zeros((n_pad, d), xs.dtype, (xs, dys, ew)), dw))


def backward(
    res: Residuals, g: jax.Array, params: MoeParams
) -> tuple[jax.Array, jax.Array, ExpertWeights]:
    """(dx, dweights, d expert weights) for the cotangent g [T, D] of `forward`'s output."""
    x, weights, ew, lay, y = res
    t, d = x.shape
    e, k = params.num_experts, params.k
    n = t * k
    sched = expert_schedule(t, params, ew)
    c0 = sched.c0
    cdt = compute_dtype(params, x)
    wdt = combine_dtype(params, cdt, weights)
    live = lay.live[..., None]
    gw = g.astype(wdt)[:, None, :]
    zero = jnp.zeros((), wdt)
    if params.weights_on_input:
        dy = jnp.where(live, gw, zero)
    else:
        dweights = jnp.sum(jnp.where(live, gw * y.astype(wdt), zero), axis=-1).astype(weights.dtype)
        dy = jnp.where(live, weights.astype(wdt)[..., None] * gw, zero)
    dy = dy.astype(output_dtype(params, cdt))
    ewc = cast_expert_weights(ew, params, cdt)
    src, idx = _routed_rows(x, weights, lay.order, params, cdt, max(sched.blocks))
    dy0 = _with_zero_row(dy.reshape(n, d))
    row = _padded_index(lay.order, max(sched.blocks), n)  # assignment of each sorted row, then row N
    dx1 = None
    if c0:
        def capacity_pass():
            rows = _capacity_rows(lay, e, c0, n)
            _, pullback = jax.vjp(lambda v, w: block_ffn(v, w, params), src[idx[rows]], ewc)
            return pullback(dy0[row[rows]])

        def skipped():
            refs = (src, dy0, ewc)
            return _zeros((e, c0, d), cdt, refs), jax.tree.map(lambda a: _zeros(a.shape, a.dtype, refs), ewc)

        dx1, dw = lax.cond(lay.c0 > 0, capacity_pass, skipped)
    else:  # per-expert arrays accumulate into stacked buffers too: `_as_given` splits them at the end
        dw = {name: _zeros(a.shape, a.dtype, (src, dy0, ewc)) for name, a in ewc.items()}
    dx2, dw = _loop_backward(src[idx], dy0[row], ewc, dw, lay, params, sched.blocks)
    drows = _unsort(dx1, dx2, lay)  # [T, k, D]: each assignment's row gradient (0 where not live)
    if params.weights_on_input:
        dx, dweights = scaled_tokens_vjp(x, weights, drows)
    else:
        dx = jnp.sum(drows, axis=1).astype(x.dtype)
    return dx, dweights, {name: _as_given(dw[name], a) for name, a in ew.items()}
