"""Pallas TPU (Mosaic) kernels of the fused `moe_ffn` op: one fused expert-FFN kernel, `gmm`, `tgmm`.

All three run over the tile layout of `grouped` (rows sorted by expert, each expert padded to whole
row tiles) with the tile -> expert map and the number of active tiles as scalar-prefetch operands,
so the BlockSpec index maps DMA exactly the weights of each tile's expert HBM -> VMEM (double
buffered by the Pallas pipeline) and tiles past the active ones are skipped without a DMA:
- `ffn`: grid (tiles, F / block_f). Per step the row tile [M, D] (resident across the F axis) times
  the gate (and up) block [D, block_f], the bias and the activation in the epilogue, then times the
  down block [block_f, D] into an f32 accumulator [M, D]; after the last F block, plus b_down, the
  tile is written in the compute dtype. One launch for the whole expert FFN; h never leaves VMEM.
- `gmm`: grid (tiles, N / block_n, K / block_k), `lhs_tile @ rhs[e]` or `@ rhs[e].T`, f32 accumulator.
- `tgmm`: grid (K / block_k, N / block_n, tiles): `lhs_tile.T @ rhs_tile` accumulated over the
  consecutive tiles of one expert into one output block [block_k, block_n] of [E, K, N].
A dimension that no multiple of 128 up to the block divides runs in blocks of 128k with a partial last
block whose tail is masked in the kernel (contraction tails; output tails are simply not written).
The forward is `ffn`; the backward (see `grouped.backward`) is 3-4 `gmm` and 2-3 `tgmm` calls.

Example (interpret mode on CPU)::

    from moefuse.kernels.moe import MoeParams, moe_ffn
    out = moe_ffn(x, weights, ids, (w_gate, w_up), w_down, MoeParams(num_experts=8, k=2),
                  impl="pallas_tpu", interpret=True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import grouped
from .grouped import TileLayout, Tiles
from .params import MoeParams
from .reference import activation

# VMEM: v5e / v6e have 128 MiB (16 MiB scoped by default), v5p / v7x 64 MiB. The kernels raise the
# scoped limit to VMEM_LIMIT (fits every generation) and `default_tiles` keeps blocks within VMEM_BUDGET.
VMEM_LIMIT = 48 * 2**20
VMEM_BUDGET = 32 * 2**20


def _lane_block(dim: int, preferred: int) -> int:
    """dim itself when it fits preferred (a full-dimension block); else the largest multiple of 128 <=
    preferred dividing dim, or (no divisor) preferred rounded down to 128: then the last block is partial
    and the kernels mask its tail (`_tail_mask`)."""
    if dim <= preferred:
        return dim
    top = max(preferred - preferred % 128, 128)
    for b in range(top, 127, -128):
        if dim % b == 0:
            return b
    return top


def _blocks(dim: int, block: int) -> int:
    return -(-dim // block)


def _tail_mask(j, block: int, dim: int, shape: tuple[int, int], axis: int):
    """[shape] bool: True where block j's index along `axis` is inside dim (rows/columns past it are
    whatever the partial block's DMA left there, possibly NaN, and must not reach a sum)."""
    return j * block + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < dim


def _ffn_vmem(bm: int, d: int, bf: int, n_in: int, itemsize: int) -> int:
    """VMEM of `ffn`: double-buffered x, y and weight blocks, the f32 accumulator."""
    return 2 * 2 * bm * d * itemsize + 2 * (n_in + 1) * d * bf * itemsize + 4 * bm * d


def default_tiles(t: int, k: int, num_experts: int, d: int, f: int, dtype, glu: bool = True) -> Tiles:
    """Tiles for the shape class: rows per tile from the mean rows per expert (8 ... 256, a multiple of
    the dtype's sublane packing), hidden blocks of 512 / 256 / 128 columns, shrunk to VMEM_BUDGET."""
    itemsize = jnp.dtype(dtype).itemsize
    sublanes = 8 * (4 // itemsize)
    mean_rows = t * k / num_experts
    bm = sublanes
    while bm < 256 and bm < mean_rows:
        bm *= 2
    bf = _lane_block(f, 512)
    n_in = 2 if glu else 1
    while _ffn_vmem(bm, d, bf, n_in, itemsize) > VMEM_BUDGET and bf > 128:
        bf = _lane_block(f, bf // 2)
    while _ffn_vmem(bm, d, bf, n_in, itemsize) > VMEM_BUDGET and bm > sublanes:
        bm //= 2
    return Tiles(block_rows=bm, block_f=bf, block_k=512, block_n=512, vmem_limit_bytes=VMEM_LIMIT)


def _compiler_params(tiles: Tiles, semantics: tuple[str, ...]) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=tiles.vmem_limit_bytes)


def _row_tile(i, num_active_ref, dummy: int):
    return jnp.where(i < num_active_ref[0], i, dummy)


def _step(i, j, num_active_ref, last: int):
    """Block index j of an active tile; the last block for skipped tiles (so no new DMA)."""
    return jnp.where(i < num_active_ref[0], j, last)


def _bias3(b: jax.Array) -> jax.Array:
    return b.reshape(b.shape[0], 1, b.shape[1])


def ffn(xs: jax.Array, w: dict[str, jax.Array], lay: TileLayout, params: MoeParams, tiles: Tiles,
        interpret: bool) -> jax.Array:
    """Expert FFN of every active row tile: xs [R, D] -> [R, D] in xs's dtype."""
    r, d = xs.shape
    f = w["gate"].shape[2]
    bm, bf = tiles.block_rows, _lane_block(f, tiles.block_f)
    nt, nf = lay.tile_expert.shape[0], _blocks(f, bf)
    tail = f % bf != 0
    names = [n for n in ("gate", "up", "b_gate", "b_up", "down", "b_down") if n in w]
    args = {n: _bias3(w[n]) if n.startswith("b_") else w[n] for n in names}

    def rows(i, j, te, na):
        return _row_tile(i, na, nt), 0

    def hidden_cols(i, j, te, na):  # gate / up [E, D, F] and their biases [E, 1, F]
        return te[i], 0, _step(i, j, na, nf - 1)

    def down_rows(i, j, te, na):
        return te[i], _step(i, j, na, nf - 1), 0

    def expert(i, j, te, na):
        return te[i], 0, 0

    specs = {"gate": pl.BlockSpec((None, d, bf), hidden_cols), "up": pl.BlockSpec((None, d, bf), hidden_cols),
             "b_gate": pl.BlockSpec((None, 1, bf), hidden_cols),
             "b_up": pl.BlockSpec((None, 1, bf), hidden_cols),
             "down": pl.BlockSpec((None, bf, d), down_rows), "b_down": pl.BlockSpec((None, 1, d), expert)}

    def kernel(te_ref, na_ref, x_ref, *refs):
        ins = dict(zip(names, refs))
        y_ref, acc_ref = refs[len(names):]
        i, j = pl.program_id(0), pl.program_id(1)

        def project(name):
            a = jnp.dot(x_ref[...], ins[name][...], preferred_element_type=jnp.float32)
            return a + ins["b_" + name][...].astype(jnp.float32) if "b_" + name in ins else a

        @pl.when(i < na_ref[0])
        def _():
            @pl.when(j == 0)
            def _():
                acc_ref[...] = jnp.zeros_like(acc_ref)

            h = activation(params, project("gate"), project("up")) if params.is_glu \
                else activation(params, project("gate"))
            down = ins["down"][...]
            if tail:  # hidden columns past F: h and the down rows there are not data
                h = jnp.where(_tail_mask(j, bf, f, h.shape, 1), h, 0.0)
                down = jnp.where(_tail_mask(j, bf, f, down.shape, 0), down, jnp.zeros((), down.dtype))
            acc_ref[...] += jnp.dot(h.astype(x_ref.dtype), down, preferred_element_type=jnp.float32)

            @pl.when(j == nf - 1)
            def _():
                y = acc_ref[...]
                if "b_down" in ins:
                    y = y + ins["b_down"][...].astype(jnp.float32)
                y_ref[...] = y.astype(y_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nt, nf),
        in_specs=[pl.BlockSpec((bm, d), rows)] + [specs[n] for n in names],
        out_specs=pl.BlockSpec((bm, d), rows),
        scratch_shapes=[pltpu.VMEM((bm, d), jnp.float32)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((r, d), xs.dtype),
        compiler_params=_compiler_params(tiles, ("parallel", "arbitrary")), interpret=interpret,
        name="moe_ffn_tpu",
    )(lay.tile_expert, lay.num_active, xs, *(args[n] for n in names))


def gmm(lhs: jax.Array, rhs: jax.Array, lay: TileLayout, tiles: Tiles, interpret: bool, *,
        transpose_rhs: bool = False, bias: jax.Array | None = None, out_dtype=jnp.float32) -> jax.Array:
    """Grouped matmul: row tile i of lhs [R, K] times rhs[e] [K, N] (or rhs[e].T for rhs [E, N, K])."""
    r, kdim = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm, bk, bn = tiles.block_rows, _lane_block(kdim, tiles.block_k), _lane_block(n, tiles.block_n)
    nt, nn, nk = lay.tile_expert.shape[0], _blocks(n, bn), _blocks(kdim, bk)
    k_tail = kdim % bk != 0  # a partial last N block needs no mask: its extra columns are not written

    def lhs_map(i, jn, jk, te, na):
        return _row_tile(i, na, nt), _step(i, jk, na, nk - 1)

    def rhs_map(i, jn, jk, te, na):
        cols, kk = _step(i, jn, na, nn - 1), _step(i, jk, na, nk - 1)
        return (te[i], cols, kk) if transpose_rhs else (te[i], kk, cols)

    def out_map(i, jn, jk, te, na):
        return _row_tile(i, na, nt), _step(i, jn, na, nn - 1)

    def bias_map(i, jn, jk, te, na):
        return te[i], 0, _step(i, jn, na, nn - 1)

    in_specs = [pl.BlockSpec((bm, bk), lhs_map),
                pl.BlockSpec((None, bn, bk) if transpose_rhs else (None, bk, bn), rhs_map)]
    args = [lhs, rhs]
    if bias is not None:
        in_specs.append(pl.BlockSpec((None, 1, bn), bias_map))
        args.append(_bias3(bias))
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(te_ref, na_ref, lhs_ref, rhs_ref, *refs):
        out_ref, acc_ref = refs[-2:]
        i, jk = pl.program_id(0), pl.program_id(2)

        @pl.when(i < na_ref[0])
        def _():
            @pl.when(jk == 0)
            def _():
                acc_ref[...] = jnp.zeros_like(acc_ref)

            a, b = lhs_ref[...], rhs_ref[...]
            if k_tail:
                a = jnp.where(_tail_mask(jk, bk, kdim, a.shape, 1), a, jnp.zeros((), a.dtype))
                b = jnp.where(_tail_mask(jk, bk, kdim, b.shape, 1 if transpose_rhs else 0), b,
                              jnp.zeros((), b.dtype))
            acc_ref[...] += jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

            @pl.when(jk == nk - 1)
            def _():
                out = acc_ref[...]
                if bias is not None:
                    out = out + refs[0][...].astype(jnp.float32)
                out_ref[...] = out.astype(out_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nt, nn, nk), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), out_map), scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((r, n), out_dtype),
        compiler_params=_compiler_params(tiles, ("parallel", "parallel", "arbitrary")), interpret=interpret,
        name="moe_gmm_tpu",
    )(lay.tile_expert, lay.num_active, *args)


def tgmm(lhs: jax.Array, rhs: jax.Array, lay: TileLayout, num_experts: int, tiles: Tiles,
         interpret: bool) -> jax.Array:
    """Per expert e: the sum over its row tiles of lhs_tile.T @ rhs_tile -> [E, K, N] f32 (0 if no rows)."""
    r, kdim = lhs.shape
    n = rhs.shape[1]
    bm, bk, bn = tiles.block_rows, _lane_block(kdim, tiles.block_k), _lane_block(n, tiles.block_n)
    nt = lay.tile_expert.shape[0]

    def lhs_map(jk, jn, i, te, na):
        return _row_tile(i, na, nt), jk

    def rhs_map(jk, jn, i, te, na):
        return _row_tile(i, na, nt), jn

    def out_map(jk, jn, i, te, na):
        return te[i], jk, jn

    def kernel(te_ref, na_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        i = pl.program_id(2)
        e = te_ref[i]
        first = (i == 0) | (te_ref[jnp.maximum(i - 1, 0)] != e)
        last = (i == na_ref[0] - 1) | (te_ref[jnp.minimum(i + 1, nt - 1)] != e)

        @pl.when(i < na_ref[0])
        def _():
            @pl.when(first)
            def _():
                acc_ref[...] = jnp.zeros_like(acc_ref)

            acc_ref[...] += jnp.dot(lhs_ref[...].T, rhs_ref[...], preferred_element_type=jnp.float32)

            @pl.when(last)
            def _():
                out_ref[...] = acc_ref[...]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(_blocks(kdim, bk), _blocks(n, bn), nt),
        in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec((bm, bn), rhs_map)],
        out_specs=pl.BlockSpec((None, bk, bn), out_map), scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)])
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((num_experts, kdim, n), jnp.float32),
        compiler_params=_compiler_params(tiles, ("parallel", "parallel", "arbitrary")), interpret=interpret,
        name="moe_tgmm_tpu",
    )(lay.tile_expert, lay.num_active, lhs, rhs)
    has_rows = (lay.expert_tiles[1:] > lay.expert_tiles[:-1])[:, None, None]
    return jnp.where(has_rows, out, 0.0)  # experts without tiles: their block is never written


BACKEND = grouped.Backend(ffn=ffn, gmm=gmm, tgmm=tgmm, default_tiles=default_tiles)
