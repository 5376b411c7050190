"""Pallas GPU (Triton) kernels of the fused `moe_ffn` op: a grouped matmul `gmm` and its transpose `tgmm`.

Triton has no scalar prefetch, so the tile -> expert map (`grouped.TileLayout.tile_expert`), the number
of active tiles and each expert's tile range are plain int32 inputs read in the kernel, and the
operands are whole-array refs indexed with `pl.ds` (a row tile, the tile's expert's weight block):
- `gmm`: grid (tiles, N / block_n); each program loops over K in blocks of block_k accumulating in f32
  `lhs_tile @ rhs[e]` (or `@ rhs[e].T`), and for one or two right-hand sides (gate and up) applies the
  biases and the activation in the epilogue. Skipped tiles (past the active ones) return at once.
- `tgmm`: grid (E, K / block_k, N / block_n); program (e, ., .) loops over expert e's row tiles
  accumulating `lhs_tile.T @ rhs_tile` (experts without rows store zeros).
The forward is two launches, `gmm(xs, gate, up) + activation` -> h [R, F] and `gmm(h, down) + b_down`;
the combine back to token order is the XLA gather and sum of `grouped.forward` (a gather-reduce
kernel would read the same [T, k, D] rows once, as XLA's fused gather-reduce already does).
Triton blocks are powers of two of at least 16: dimensions that are not a multiple of 16 are padded
with zeros around the kernels (a copy; real models' D and F are multiples of 128).

Example (interpret mode on CPU)::

    from moefuse.kernels.moe import MoeParams, moe_ffn
    out = moe_ffn(x, weights, ids, (w_gate, w_up), w_down, MoeParams(num_experts=8, k=2),
                  impl="pallas_gpu", interpret=True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import grouped
from .grouped import TileLayout, Tiles
from .params import MoeParams
from .reference import activation

ALIGN = 16  # Triton's smallest dot dimension


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _pow2_block(dim: int, preferred: int) -> int:
    """The largest power of two <= preferred dividing dim (dim a multiple of ALIGN)."""
    b = preferred
    while dim % b:
        b //= 2
    return b


def default_tiles(t: int, k: int, num_experts: int, d: int, f: int, dtype, glu: bool = True) -> Tiles:
    """Rows per tile 16 ... 128 from the mean rows per expert; 64-wide N and K blocks (fit the
    shared memory of A100 / H100 at 3 stages in bf16 and f32)."""
    mean_rows = t * k / num_experts
    bm = ALIGN
    while bm < 128 and bm < mean_rows:
        bm *= 2
    return Tiles(block_rows=bm, block_f=64, block_k=64, block_n=64, num_warps=4, num_stages=3)


def _pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if a.shape == shape:
        return a
    return jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)])


def _compiler_params(tiles: Tiles) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def gmm(lhs: jax.Array, rhs: jax.Array | tuple[jax.Array, ...], lay: TileLayout, tiles: Tiles,
        interpret: bool, *, transpose_rhs: bool = False, bias=None, out_dtype=jnp.float32,
        params: MoeParams | None = None, block_n: int | None = None) -> jax.Array:
    """Grouped matmul: row tile i of lhs [R, K] times rhs[e] [K, N] (or rhs[e].T for rhs [E, N, K]).

    With a pair rhs = (gate, up) (and bias a pair or None) and params: activation(params, gate, up)
    of the two products; with one rhs and params: activation(params, product). f32 accumulation.
    """
    rhs = rhs if isinstance(rhs, tuple) else (rhs,)
    bias = bias if isinstance(bias, tuple) else (bias,) * len(rhs)
    r, kdim = lhs.shape
    e = rhs[0].shape[0]
    n = rhs[0].shape[1] if transpose_rhs else rhs[0].shape[2]
    kp, np_ = _round_up(kdim, ALIGN), _round_up(n, ALIGN)
    bm, bk, bn = tiles.block_rows, _pow2_block(kp, tiles.block_k), _pow2_block(np_, block_n or tiles.block_n)
    nt = lay.tile_expert.shape[0]
    lhs = _pad_to(lhs, (r, kp))
    rhs = tuple(_pad_to(w, (e, np_, kp) if transpose_rhs else (e, kp, np_)) for w in rhs)
    biases = tuple(_pad_to(b, (e, np_)) for b in bias if b is not None)
    n_rhs, n_bias = len(rhs), len(biases)

    def kernel(te_ref, na_ref, lhs_ref, *refs):
        w_refs, b_refs, out_ref = refs[:n_rhs], refs[n_rhs:n_rhs + n_bias], refs[-1]
        i, jn = pl.program_id(0), pl.program_id(1)
        rows, cols = pl.ds(i * bm, bm), pl.ds(jn * bn, bn)

        @pl.when(i < na_ref[0])
        def _():
            ex = te_ref[i]

            def step(jk, accs):
                kk = pl.ds(jk * bk, bk)
                a = lhs_ref[rows, kk]
                out = []
                for w_ref, acc in zip(w_refs, accs):
                    if transpose_rhs:
                        prod = pltriton.dot(a, w_ref[ex, cols, kk], trans_b=True)
                    else:
                        prod = pltriton.dot(a, w_ref[ex, kk, cols])
                    out.append(acc + prod.astype(jnp.float32))
                return tuple(out)

            accs = lax.fori_loop(0, kp // bk, step, tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs))
            accs = [acc + b_ref[ex, cols].astype(jnp.float32)[None, :] for acc, b_ref in zip(accs, b_refs)] \
                if n_bias else list(accs)
            res = activation(params, *accs) if params is not None else accs[0]
            out_ref[rows, cols] = res.astype(out_ref.dtype)

    out = pl.pallas_call(
        kernel, grid=(nt, np_ // bn), out_shape=jax.ShapeDtypeStruct((r, np_), out_dtype),
        compiler_params=_compiler_params(tiles), interpret=interpret, name="moe_gmm_gpu",
    )(lay.tile_expert, lay.num_active, lhs, *rhs, *biases)
    return out[:, :n] if np_ != n else out


def tgmm(lhs: jax.Array, rhs: jax.Array, lay: TileLayout, num_experts: int, tiles: Tiles,
         interpret: bool) -> jax.Array:
    """Per expert e: the sum over its row tiles of lhs_tile.T @ rhs_tile -> [E, K, N] f32 (0 if no rows)."""
    r, kdim = lhs.shape
    n = rhs.shape[1]
    kp, np_ = _round_up(kdim, ALIGN), _round_up(n, ALIGN)
    bm, bk, bn = tiles.block_rows, _pow2_block(kp, tiles.block_k), _pow2_block(np_, tiles.block_n)
    lhs, rhs = _pad_to(lhs, (r, kp)), _pad_to(rhs, (r, np_))

    def kernel(et_ref, lhs_ref, rhs_ref, out_ref):
        ex, jk, jn = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        kk, cols = pl.ds(jk * bk, bk), pl.ds(jn * bn, bn)

        def step(tile, acc):
            rows = pl.ds(tile * bm, bm)
            prod = pltriton.dot(lhs_ref[rows, kk], rhs_ref[rows, cols], trans_a=True)
            return acc + prod.astype(jnp.float32)

        acc = lax.fori_loop(et_ref[ex], et_ref[ex + 1], step, jnp.zeros((bk, bn), jnp.float32))
        out_ref[ex, kk, cols] = acc

    out = pl.pallas_call(
        kernel, grid=(num_experts, kp // bk, np_ // bn),
        out_shape=jax.ShapeDtypeStruct((num_experts, kp, np_), jnp.float32),
        compiler_params=_compiler_params(tiles), interpret=interpret, name="moe_tgmm_gpu",
    )(lay.expert_tiles, lhs, rhs)
    return out[:, :kdim, :n] if (kp, np_) != (kdim, n) else out


def ffn(xs: jax.Array, w: dict[str, jax.Array], lay: TileLayout, params: MoeParams, tiles: Tiles,
        interpret: bool) -> jax.Array:
    """Expert FFN of every active row tile in two launches: gate/up + activation, then down + b_down."""
    names = ("gate", "up") if params.is_glu else ("gate",)
    bias = tuple(w.get("b_" + n) for n in names)
    h = gmm(xs, tuple(w[n] for n in names), lay, tiles, interpret, bias=bias if bias[0] is not None else None,
            out_dtype=xs.dtype, params=params, block_n=tiles.block_f)
    return gmm(h, w["down"], lay, tiles, interpret, bias=w.get("b_down"), out_dtype=xs.dtype)


BACKEND = grouped.Backend(ffn=ffn, gmm=gmm, tgmm=tgmm, default_tiles=default_tiles)
