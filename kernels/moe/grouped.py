"""The `moe_ffn` op over grouped-matmul kernels: the tile layout, the forward and the routed backward.

Shared by the Pallas backends (`pallas_tpu`, `pallas_gpu`); each supplies three kernels and its
tile defaults (`Backend`):
- `ffn(xs, w, lay, params, tiles, interpret)`: the expert FFN of every row tile (gate/up matmul with
  the activation in its epilogue, then the down matmul) -> rows [R, D] in the compute dtype;
- `gmm(lhs, rhs, lay, tiles, interpret, transpose_rhs=, bias=, out_dtype=)`: grouped matmul, each row
  tile times its expert's matrix (`rhs[e]` or `rhs[e].T`), f32 accumulation;
- `tgmm(lhs, rhs, lay, num_experts, tiles, interpret)`: transposed grouped matmul, per expert the sum
  over its row tiles of `lhs_tile.T @ rhs_tile` -> [E, K, N] f32 (zeros for experts without rows).

Dispatch: the live assignments (`xla.live_mask`: in range and within the capacity) are sorted by
expert (stable), and each expert's rows are padded to a multiple of the row tile, so a tile never
crosses an expert boundary and experts without rows get no tile. `tile_expert[i]` is the expert of
tile i; tiles past `num_active` (the static grid covers the most tiles any routing can need) are
skipped by the kernels, and read and write one extra *dummy* tile at the end of the row buffers.
The gather of token rows into that order and the weighted combine back to token order (a gather of
each assignment's row and a sum over k, in f32) are XLA ops around the kernels; with
params.weights_on_input the gathered rows are each assignment's token times its weight, the combine
an unweighted sum, and the backward reads d(weights) and dx from the rows' gradient.

Fused gate/up weights ([E, D, 2F], "concat" or "interleaved") are split into gate and up arrays
before the kernels: a copy of w_in on every call (pre-split weights avoid it).

Example::

    from moefuse.kernels.moe import MoeParams, moe_ffn
    out = moe_ffn(x, weights, ids, (w_gate, w_up), w_down, MoeParams(num_experts=8, k=2),
                  impl="pallas_tpu", interpret=True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .params import MoeParams
from .reference import (
    ExpertWeights,
    activation,
    cast_expert_weights,
    combine_dtype,
    compute_dtype,
    result_dtype,
    scaled_tokens,
    scaled_tokens_vjp,
    split_gate_up,
)
from .xla import live_mask


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes of the grouped kernels (backend-specific limits: see each backend's `default_tiles`).

    block_rows: rows per tile (M); block_f: hidden columns per step of the fused FFN; block_k /
    block_n: contraction / output columns per block of `gmm` and `tgmm`.
    """

    block_rows: int
    block_f: int
    block_k: int
    block_n: int
    vmem_limit_bytes: int | None = None  # TPU: the kernels' scoped VMEM limit
    num_warps: int | None = None  # GPU (Triton)
    num_stages: int | None = None  # GPU (Triton)


@dataclasses.dataclass(frozen=True)
class Backend:
    ffn: Callable
    gmm: Callable
    tgmm: Callable
    default_tiles: Callable  # (t, k, num_experts, d, f, dtype, glu) -> Tiles

    def tiles_for(self, x: jax.Array, ew: ExpertWeights, params: MoeParams, tiles: Tiles | None) -> Tiles:
        if tiles is not None:
            return tiles
        e, f, d = ew["w_down"].shape
        return self.default_tiles(x.shape[0], params.k, e, d, f, compute_dtype(params, x), params.is_glu)


class TileLayout(NamedTuple):
    """Assignments sorted by expert, each expert's rows padded to whole tiles (R = (tiles + 1) * M rows)."""

    live: jax.Array  # [T, k] bool
    row_of: jax.Array  # [T, k] int32: padded row of each assignment (a dummy-tile row where not live)
    row_assign: jax.Array  # [R] int32: flat assignment t * k + j of each row; T * k for padding
    tile_expert: jax.Array  # [tiles] int32: expert of each tile (the last active tile's past num_active)
    num_active: jax.Array  # [1] int32: tiles in use
    expert_tiles: jax.Array  # [E + 1] int32: expert e owns tiles expert_tiles[e] .. expert_tiles[e + 1] - 1


def max_tiles(n: int, num_experts: int, block_rows: int) -> int:
    """The most tiles n assignments can need: each expert with rows wastes less than one tile."""
    return max((n + min(num_experts, n) * (block_rows - 1)) // block_rows, 1)


def tile_layout(ids: jax.Array, params: MoeParams, block_rows: int) -> TileLayout:
    e = params.num_experts
    t, k = ids.shape
    n = t * k
    bm = block_rows
    live = live_mask(ids, params)
    key = jnp.where(live, ids, e).reshape(-1)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    starts = jnp.searchsorted(key[order], lax.iota(jnp.int32, e + 1), side="left").astype(jnp.int32)
    counts = starts[1:] - starts[:-1]
    tile_end = jnp.cumsum((counts + bm - 1) // bm).astype(jnp.int32)
    expert_tiles = jnp.concatenate([jnp.zeros((1,), jnp.int32), tile_end])
    num_active = tile_end[-1]
    nt = max_tiles(n, e, bm)
    tile = lax.iota(jnp.int32, nt)
    owner = jnp.searchsorted(tile_end, tile, side="right").astype(jnp.int32)
    last = jnp.minimum(jnp.searchsorted(tile_end, num_active - 1, side="right"), e - 1).astype(jnp.int32)
    tile_expert = jnp.where(tile < num_active, jnp.minimum(owner, e - 1), jnp.maximum(last, 0))
    # row r of the padded buffer: tile r // M of expert er, rank r - (first row of er) within its rows
    r = lax.iota(jnp.int32, (nt + 1) * bm)
    er = jnp.concatenate([tile_expert, jnp.zeros((1,), jnp.int32)])[r // bm]
    rank = r - expert_tiles[er] * bm
    valid = (r // bm < num_active) & (rank < counts[er])
    row_assign = jnp.where(valid, order[jnp.clip(starts[er] + rank, 0, n - 1)], n)
    inv = jnp.zeros((n,), jnp.int32).at[order].set(lax.iota(jnp.int32, n))  # p -> sorted position
    kc = jnp.minimum(key, e - 1)
    row_of = jnp.where(key < e, expert_tiles[kc] * bm + inv - starts[kc], nt * bm)
    return TileLayout(live, row_of.reshape(t, k), row_assign, tile_expert, num_active.reshape(1),
                      expert_tiles)


def expert_matrices(ew: ExpertWeights, params: MoeParams, cdt) -> dict[str, jax.Array]:
    """gate, up (GLU only), down and their biases (b_gate, b_up, b_down when present), in dtype cdt."""
    w = cast_expert_weights(ew, params, cdt)
    out = {"gate": w["w_in"], "down": w["w_down"]}
    if "b_in" in w:
        out["b_gate"], out["b_down"] = w["b_in"], w["b_down"]
    if params.is_glu and params.fused_gate_up:
        out["gate"], out["up"] = split_gate_up(w["w_in"], params)
        if "b_in" in w:
            out["b_gate"], out["b_up"] = split_gate_up(w["b_in"], params)
    elif params.is_glu:
        out["up"] = w["w_up"]
        if "b_up" in w:
            out["b_up"] = w["b_up"]
    return out


def _join_gate_up(gate: jax.Array, up: jax.Array, params: MoeParams) -> jax.Array:
    """Inverse of `split_gate_up`: [..., F] pair -> [..., 2F] in params.gate_up_layout."""
    if params.gate_up_layout == "interleaved":
        return jnp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])
    return jnp.concatenate([gate, up], axis=-1)


def _with_zero_row(v: jax.Array) -> jax.Array:
    return jnp.concatenate([v, jnp.zeros((1, v.shape[1]), v.dtype)])


def _sorted_rows(x, weights, lay: TileLayout, params: MoeParams, cdt) -> jax.Array:
    """The rows [R, D] the kernels run on, in cdt: each padded row's token (zero for padding), or with
    params.weights_on_input its assignment's scaled row (`scaled_tokens`)."""
    if params.weights_on_input:
        return _with_zero_row(scaled_tokens(x, weights, cdt).reshape(-1, x.shape[1]))[lay.row_assign]
    return _with_zero_row(x.astype(cdt))[lay.row_assign // params.k]


def _per_assignment(rows: jax.Array, lay: TileLayout) -> jax.Array:
    """rows [R, D] -> [T, k, D] in f32: each assignment's row, 0 where not live."""
    v = rows[lay.row_of].astype(jnp.float32)
    return jnp.where(lay.live[..., None], v, 0.0)


class Residuals(NamedTuple):
    x: jax.Array
    weights: jax.Array
    ew: ExpertWeights
    lay: TileLayout
    y_rows: jax.Array | None  # [R, D] expert outputs per padded row, compute dtype (None: weights_on_input)


def forward(x, weights, ids, ew: ExpertWeights, params: MoeParams, kernels: Backend, tiles: Tiles | None,
            interpret: bool) -> tuple[jax.Array, Residuals]:
    """out [T, D] (params.out_dtype or x's dtype) and the residuals for `backward`, on validated
    inputs (tiles None: the backend's defaults for the shape)."""
    if params.projection_dtype is not None:
        raise ValueError(f"moe_ffn: the Pallas kernels round only the FFN output, not each projection to "
                         f"projection_dtype={params.projection_dtype}: use impl='xla'")
    tiles = kernels.tiles_for(x, ew, params, tiles)
    cdt = compute_dtype(params, x)
    wdt = combine_dtype(params, cdt, weights)
    lay = tile_layout(ids, params, tiles.block_rows)
    xs = _sorted_rows(x, weights, lay, params, cdt)
    y_rows = kernels.ffn(xs, expert_matrices(ew, params, cdt), lay, params, tiles, interpret)
    y = y_rows[lay.row_of].astype(wdt)
    y = y if params.weights_on_input else weights.astype(wdt)[..., None] * y
    contrib = jnp.where(lay.live[..., None], y, jnp.zeros((), wdt))
    out = jnp.sum(contrib.astype(jnp.float32), axis=1).astype(result_dtype(params, x))
    return out, Residuals(x, weights, ew, lay, None if params.weights_on_input else y_rows)


def _bias_grad(rows: jax.Array, lay: TileLayout, n: int, num_experts: int, block_rows: int) -> jax.Array:
    """Per-expert sum of the valid rows [R, N] -> [E, N] f32."""
    expert = jnp.concatenate([lay.tile_expert, jnp.zeros((1,), jnp.int32)])[
        lax.iota(jnp.int32, rows.shape[0]) // block_rows]
    valid = (lay.row_assign < n)[:, None]
    return jax.ops.segment_sum(jnp.where(valid, rows.astype(jnp.float32), 0.0), expert, num_experts)


def backward(res: Residuals, g: jax.Array, params: MoeParams, kernels: Backend, tiles: Tiles | None,
             interpret: bool) -> tuple[jax.Array, jax.Array, ExpertWeights]:
    """(dx, dweights, d expert weights) for the cotangent g [T, D] of `forward`'s output."""
    x, weights, ew, lay, y_rows = res
    tiles = kernels.tiles_for(x, ew, params, tiles)
    t, d = x.shape
    e, k = params.num_experts, params.k
    n = t * k
    cdt = compute_dtype(params, x)
    wdt = combine_dtype(params, cdt, weights)
    kw = dict(lay=lay, tiles=tiles, interpret=interpret)
    live = lay.live[..., None]
    gw = g.astype(wdt)[:, None, :]
    zero = jnp.zeros((), wdt)
    if params.weights_on_input:
        dy = jnp.where(live, gw, zero)
    else:
        y = y_rows[lay.row_of].astype(wdt)
        dweights = jnp.sum(jnp.where(live, gw * y, zero), axis=-1).astype(weights.dtype)
        dy = jnp.where(live, weights.astype(wdt)[..., None] * gw, zero)
    dys = _with_zero_row(dy.astype(cdt).reshape(n, d))[lay.row_assign]  # [R, D]
    xs = _sorted_rows(x, weights, lay, params, cdt)
    w = expert_matrices(ew, params, cdt)

    def project(name):  # the pre-activation again (f32), rather than keeping [R, F] from the forward
        return kernels.gmm(xs, w[name], bias=w.get("b_" + name), out_dtype=jnp.float32, **kw)

    gate = project("gate")
    if params.is_glu:
        h, act_vjp = jax.vjp(lambda g_, u_: activation(params, g_, u_), gate, project("up"))
    else:
        h, act_vjp = jax.vjp(lambda g_: activation(params, g_), gate)
    grads = {"down": kernels.tgmm(h.astype(cdt), dys, num_experts=e, **kw)}
    dh = kernels.gmm(dys, w["down"], transpose_rhs=True, out_dtype=jnp.float32, **kw)
    dpre = dict(zip(("gate", "up"), act_vjp(dh)))
    dxs = jnp.zeros(xs.shape, jnp.float32)
    for name, da in dpre.items():
        da = da.astype(cdt)
        grads[name] = kernels.tgmm(xs, da, num_experts=e, **kw)
        dxs = dxs + kernels.gmm(da, w[name], transpose_rhs=True, out_dtype=jnp.float32, **kw)
    if params.has_expert_bias:
        grads["b_down"] = _bias_grad(dys, lay, n, e, tiles.block_rows)
        for name, da in dpre.items():
            grads["b_" + name] = _bias_grad(da.astype(cdt), lay, n, e, tiles.block_rows)
    if params.weights_on_input:
        dx, dweights = scaled_tokens_vjp(x, weights, _per_assignment(dxs, lay))
    else:
        dx = jnp.sum(_per_assignment(dxs, lay), axis=1).astype(x.dtype)
    if params.is_glu and params.fused_gate_up:
        dew = {"w_in": _join_gate_up(grads["gate"], grads["up"], params), "w_down": grads["down"]}
        if params.has_expert_bias:
            dew["b_in"] = _join_gate_up(grads["b_gate"], grads["b_up"], params)
    else:
        names = {"w_in": "gate", "w_up": "up", "w_down": "down", "b_in": "b_gate", "b_up": "b_up",
                 "b_down": "b_down"}
        dew = {name: grads[names[name]] for name in ew}
    if params.has_expert_bias:
        dew["b_down"] = grads["b_down"]
    return dx, dweights, {name: dew[name].astype(a.dtype) for name, a in ew.items()}
