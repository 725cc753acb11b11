"""Heterogeneous multi-LoRA Pallas kernels reading adapter rank-rows straight from the unified pool.

Same calling convention as `reference.lora_delta` (the spec):

    lora_delta(x, pool, layer, a_rows, b_rows, ranks, token_adapter, out_features[, b_ranks,
               combine_shrink]) -> [T, out] f32

Each token may use a different adapter of a different rank, or none (token_adapter -1 -> zeros).
The op is a shrink, v[t, :r] = x[t] A_s^T, then an expand, y[t] = v[t, :r] B_s^T (B^T rows carry
the scaling), each a pallas_call. Rank-row i of A, chunk c, is pool row a_rows[s, i, c] of the
layer: flat id r = (half * num_pages + page) * page_size + offset (see lora/layout.py); a rank-row
wider than the pool row (row_width W) spans chunks(width) consecutive chunks, the tail zero-padded.
Rows are gathered inside the kernels by these ids; nothing is copied into dense per-adapter
buffers, and the compute loops only to each adapter's real rank (rows past it are never read, so
their ids may point anywhere).

Two variants:
  * MBGMV (decode, few tokens): one program per (token, rank block) for the shrink and per
    (token, output block) for the expand; each program reads its token's adapter id, rank and
    rank-row ids, and loops over the token's rank with a dynamic bound. Tokens sharing an adapter
    re-read its rows, which is what keeps the cost independent of how many adapters are mixed.
  * SGMV (prefill, many tokens): tokens are sorted by adapter on device (stable argsort) and cut
    into tiles of `block_tokens` tokens of one adapter each (segments padded to a tile multiple,
    so the tile count has a static bound); one grouped matmul per (tile, rank block) for the
    shrink and per (tile, output block) for the expand, the rank-block loop again bounded by the
    tile's adapter rank; the padded result is gathered back into the original token order.

GPU lowering is Pallas-Triton, chosen explicitly through the Triton CompilerParams. Triton has
neither scalar prefetch nor scratch, so every small table (layer, token adapters, ranks, row ids,
tiles) and the whole pool are passed as whole-array blocks and indexed inside the kernel, the
pool gathered row by row (or several rank-rows at once with vector indices) the way jax's
paged_attention gathers KV pages. Every loaded tensor has a power-of-two size: loads along a pool
row use the largest power of two dividing W (capped by a knob), never a masked tail. The
interpret mode (CPU tests) runs the same kernel bodies.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve.pallas.tiles import segment_tiles
from jaxserve.pallas.triton_backend import compiler_params, next_pow2, pltriton, quiet, whole_block

# pl.dot moved to the Triton module (jax 0.10 warns when it is reached through pallas).
_dot = getattr(pltriton, "dot", None) or getattr(pl, "dot", None)

DECODE_MAX_TOKENS = 32   # lora_delta: T <= this -> MBGMV, else SGMV (a static shape choice)
_F32 = jnp.float32


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing n, at most cap: Triton tensors need power-of-two sizes, and a
    block that divides the pool row never straddles two chunks nor needs a masked tail."""
    return min(n & -n, 1 << (max(cap, 1).bit_length() - 1))


def _divmod(a, b: int):
    """Non-negative int32 divmod by a static int with plain lax.div/rem (jnp's floor-division
    sign fix-ups trip the Triton lowering, and are not needed for indices)."""
    b = jnp.int32(b)
    return lax.div(a, b), lax.rem(a, b)


def _pool_rows(pool_ref, layer, rows, start, size):
    """Gather pool rows (flat ids of one layer, scalar or vector) -> [..., size] at column start."""
    _, _, num_pages, page_size, _ = pool_ref.shape
    half_page, offset = _divmod(rows, page_size)
    half, page = _divmod(half_page, num_pages)
    return pool_ref[layer, half, page, offset, pl.ds(start, size)]


def _matmul(a, b, *, trans_b=False):
    """a [M, K] @ b [K, N] (b [N, K] with trans_b) -> [M, N] float32. Triton's tl.dot needs M, N
    and K >= 16, so smaller tiles (a narrow pool row, a small tuning choice) fall back to a
    broadcast-multiply-sum, which Triton lowers to plain vector code. float32 operands ask for
    IEEE precision (not TF32), so a float32 pool matches the float32 reference closely."""
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    if min(m, n, k) >= 16 and _dot is not None:
        precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
        return _dot(a, b, trans_b=trans_b, precision=precision)
    a, b = a.astype(_F32), b.astype(_F32)
    if trans_b:
        return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _adapter_rank(which, ranks_ref):
    """(clamped adapter index, its rank; 0 for 'no adapter')."""
    a = jnp.maximum(which, 0)
    return a, jnp.where(which >= 0, ranks_ref[a], 0)


def _pallas(kernel, *, grid, in_specs, out_spec, out_shape, args, poison, interpret, num_warps, num_stages,
            name):
    """pallas_call through the Triton backend. poison=True starts the output from a NaN buffer
    (aliased in), so an element a kernel fails to write shows up in tests on any backend."""
    aliases = {}
    if poison:
        args = (*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs = [*in_specs, out_spec]
        aliases = {len(args) - 1: 0}
        body = kernel

        def kernel(*refs):  # the aliased input is not read
            body(*refs[:-2], refs[-1])
    with quiet():
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
            input_output_aliases=aliases, interpret=interpret, name=name,
            compiler_params=compiler_params(num_warps, num_stages))(*args)


# ---------------------------------------------------------------------------------------------
# MBGMV: decode (per-token gathers)
# ---------------------------------------------------------------------------------------------

def _mbgmv_shrink_kernel(layer_ref, adapter_ref, ranks_ref, rows_ref, x_ref, pool_ref, v_ref, *,
                         rank_block, block_w):
    """Program (t, k): v[t, k*rb : (k+1)*rb] for token t. Loops over rank-rows k*rb .. min(rank,
    (k+1)*rb) (an empty loop past the rank), each a dot of x[t] with the row's chunks."""
    t, k = pl.program_id(0), pl.program_id(1)
    a, rank = _adapter_rank(adapter_ref[t], ranks_ref)
    layer = layer_ref[0]
    chunks = rows_ref.shape[2]
    row_width = pool_ref.shape[4]
    sub = row_width // block_w
    lo = k * rank_block
    hi = jnp.maximum(jnp.minimum(rank, lo + rank_block), lo)

    def rank_row(i, v):
        def piece(q, acc):  # q walks (chunk, block_w piece of the pool row)
            c, off = _divmod(q, sub)
            off = off * block_w
            w = _pool_rows(pool_ref, layer, rows_ref[a, i, c], off, block_w)
            xv = x_ref[pl.ds(c * row_width + off, block_w)]
            return acc + xv.astype(_F32) * w.astype(x_ref.dtype).astype(_F32)
        acc = lax.fori_loop(0, chunks * sub, piece, jnp.zeros((block_w,), _F32))
        return jnp.where(lax.iota(jnp.int32, rank_block) == i - lo, jnp.sum(acc), v)

    v_ref[...] = lax.fori_loop(lo, hi, rank_row, jnp.zeros((rank_block,), _F32))


def _mbgmv_expand_kernel(layer_ref, adapter_ref, ranks_ref, rows_ref, v_ref, pool_ref, y_ref, *, block_out):
    """Program (t, j): output block j (block_out columns of one B^T chunk) of token t, summing
    v[t, i] * B^T[i, block] over i < the token's rank."""
    t, j = pl.program_id(0), pl.program_id(1)
    a, rank = _adapter_rank(adapter_ref[t], ranks_ref)
    layer = layer_ref[0]
    sub = pool_ref.shape[4] // block_out
    c, off = _divmod(j, sub)
    off = off * block_out

    def rank_row(i, acc):
        w = _pool_rows(pool_ref, layer, rows_ref[a, i, c], off, block_out)
        return acc + v_ref[i] * w.astype(_F32)

    y_ref[...] = lax.fori_loop(0, rank, rank_row, jnp.zeros((block_out,), _F32))


def mbgmv_shrink(x, pool, layer, a_rows, ranks, token_adapter, *, rank_block=16, block_w=256,
                 num_warps=4, num_stages=2, interpret=False, poison=False):
    """v [T, Rp] float32 (Rp = R rounded up to rank_block); v[t, i] = x[t] . A_s[i] for i < rank_s,
    0 elsewhere. x [T, chunks(in) * W] (zero-padded to whole pool rows)."""
    num_tokens, in_padded = x.shape
    _, max_rank, _ = a_rows.shape
    rank_block = next_pow2(min(rank_block, max_rank))
    padded_rank = pl.cdiv(max_rank, rank_block) * rank_block
    bw = _pow2_divisor(pool.shape[4], block_w)
    kernel = functools.partial(_mbgmv_shrink_kernel, rank_block=rank_block, block_w=bw)
    return _pallas(
        kernel, grid=(num_tokens, padded_rank // rank_block),
        in_specs=[whole_block((1,)), whole_block(token_adapter.shape), whole_block(ranks.shape), whole_block(a_rows.shape),
                  pl.BlockSpec((None, in_padded), lambda t, k: (t, 0)), whole_block(pool.shape)],
        out_spec=pl.BlockSpec((None, rank_block), lambda t, k: (t, k)),
        out_shape=jax.ShapeDtypeStruct((num_tokens, padded_rank), _F32),
        args=(layer, token_adapter, ranks, a_rows, x, pool), poison=poison, interpret=interpret,
        num_warps=num_warps, num_stages=num_stages, name="lora_mbgmv_shrink")


def mbgmv_expand(v, pool, layer, b_rows, ranks, token_adapter, *, block_out=128, num_warps=4, num_stages=2,
                 interpret=False, poison=False):
    """y [T, chunks(out) * W] float32 = v[t, :rank] B_s^T (0 for tokens without an adapter)."""
    num_tokens, padded_rank = v.shape
    row_width = pool.shape[4]
    bo = _pow2_divisor(row_width, block_out)
    out_padded = b_rows.shape[2] * row_width
    kernel = functools.partial(_mbgmv_expand_kernel, block_out=bo)
    return _pallas(
        kernel, grid=(num_tokens, out_padded // bo),
        in_specs=[whole_block((1,)), whole_block(token_adapter.shape), whole_block(ranks.shape), whole_block(b_rows.shape),
                  pl.BlockSpec((None, padded_rank), lambda t, j: (t, 0)), whole_block(pool.shape)],
        out_spec=pl.BlockSpec((None, bo), lambda t, j: (t, j)),
        out_shape=jax.ShapeDtypeStruct((num_tokens, out_padded), _F32),
        args=(layer, token_adapter, ranks, b_rows, v, pool), poison=poison, interpret=interpret,
        num_warps=num_warps, num_stages=num_stages, name="lora_mbgmv_expand")


# ---------------------------------------------------------------------------------------------
# SGMV: prefill (tokens grouped into single-adapter tiles)
# ---------------------------------------------------------------------------------------------

def _rank_block_rows(rows_ref, a, c, base, rank, rank_block):
    """Row ids of rank-rows base .. base + rank_block of adapter a, chunk c; rows at or past the
    rank read row 0 (always in bounds) and are masked out by the caller."""
    max_rank = rows_ref.shape[1]
    i = base + lax.iota(jnp.int32, rank_block)
    live = i < rank
    return jnp.where(live, rows_ref[a, jnp.minimum(i, max_rank - 1), c], 0), live


def _sgmv_shrink_kernel(layer_ref, tile_adapter_ref, ranks_ref, rows_ref, tokens_ref, x_ref, pool_ref, v_ref, *,
                        rank_block, block_w):
    """Program (m, k): v[tile m rows, rank block k] = X_tile [bt, in] @ A_s[k-block]^T, one grouped
    matmul over the input width; blocks at or past the tile's rank do no work (zeros)."""
    m, k = pl.program_id(0), pl.program_id(1)
    a, rank = _adapter_rank(tile_adapter_ref[m], ranks_ref)
    layer = layer_ref[0]
    chunks = rows_ref.shape[2]
    row_width = pool_ref.shape[4]
    sub = row_width // block_w
    base = k * rank_block
    tokens = jnp.maximum(tokens_ref[...], 0)        # padding rows compute junk that is never read
    block_tokens = tokens.shape[0]

    def piece(q, acc):  # q walks (chunk, block_w piece of the pool row)
        c, off = _divmod(q, sub)
        off = off * block_w
        rows, live = _rank_block_rows(rows_ref, a, c, base, rank, rank_block)
        w = _pool_rows(pool_ref, layer, rows, off, block_w)                 # [rb, bw]
        w = jnp.where(live[:, None], w.astype(x_ref.dtype), 0)
        xt = x_ref[tokens, pl.ds(c * row_width + off, block_w)]             # [bt, bw]
        return acc + _matmul(xt, w, trans_b=True)

    live_block = jnp.minimum(jnp.maximum(rank - base, 0), 1)   # int arithmetic: a bool->int
    steps = live_block * (chunks * sub)                         # convert trips the Triton scf.for
    v_ref[...] = lax.fori_loop(0, steps, piece, jnp.zeros((block_tokens, rank_block), _F32))


def _sgmv_expand_kernel(layer_ref, tile_adapter_ref, ranks_ref, rows_ref, v_ref, pool_ref, y_ref, *,
                        rank_block, block_out):
    """Program (m, j): y[tile m rows, output block j] = V_tile[:, :rank] @ B_s^T[:rank, block],
    looping over rank blocks up to the tile's adapter rank."""
    m, j = pl.program_id(0), pl.program_id(1)
    a, rank = _adapter_rank(tile_adapter_ref[m], ranks_ref)
    layer = layer_ref[0]
    sub = pool_ref.shape[4] // block_out
    c, off = _divmod(j, sub)
    off = off * block_out
    block_tokens = v_ref.shape[0]

    def rank_blk(kb, acc):
        base = kb * rank_block
        rows, live = _rank_block_rows(rows_ref, a, c, base, rank, rank_block)
        w = _pool_rows(pool_ref, layer, rows, off, block_out)               # [rb, bo]
        w = jnp.where(live[:, None], w.astype(_F32), 0.0)
        vt = v_ref[:, pl.ds(base, rank_block)]                              # [bt, rb]
        return acc + _matmul(vt, w)

    num_blocks = lax.div(rank + (rank_block - 1), jnp.int32(rank_block))
    y_ref[...] = lax.fori_loop(0, num_blocks, rank_blk, jnp.zeros((block_tokens, block_out), _F32))


def sgmv_shrink(x, pool, layer, a_rows, ranks, tile_adapter, tile_tokens, *, block_tokens=16, rank_block=16,
                block_w=64, num_warps=4, num_stages=2, interpret=False, poison=False):
    """v [M * bt, Rp] float32 in padded tile order (Rp = R rounded up to rank_block): row p holds
    x[tile_tokens[p]] A_s^T for the tile's adapter s up to its rank, 0 past it. Tiles come from
    segment_tiles with the same block_tokens (a power of two)."""
    _, max_rank, _ = a_rows.shape
    num_tiles = tile_adapter.shape[0]
    rank_block = next_pow2(min(rank_block, max_rank))
    padded_rank = pl.cdiv(max_rank, rank_block) * rank_block
    bw = _pow2_divisor(pool.shape[4], block_w)
    kernel = functools.partial(_sgmv_shrink_kernel, rank_block=rank_block, block_w=bw)
    return _pallas(
        kernel, grid=(num_tiles, padded_rank // rank_block),
        in_specs=[whole_block((1,)), whole_block(tile_adapter.shape), whole_block(ranks.shape), whole_block(a_rows.shape),
                  pl.BlockSpec((block_tokens,), lambda m, k: (m,)), whole_block(x.shape), whole_block(pool.shape)],
        out_spec=pl.BlockSpec((block_tokens, rank_block), lambda m, k: (m, k)),
        out_shape=jax.ShapeDtypeStruct((num_tiles * block_tokens, padded_rank), _F32),
        args=(layer, tile_adapter, ranks, a_rows, tile_tokens, x, pool), poison=poison, interpret=interpret,
        num_warps=num_warps, num_stages=num_stages, name="lora_sgmv_shrink")


def sgmv_expand(v, pool, layer, b_rows, ranks, tile_adapter, *, block_tokens=16, rank_block=16, block_out=64,
                num_warps=4, num_stages=2, interpret=False, poison=False):
    """y [M * bt, chunks(out) * W] float32 in padded tile order (0 for unused tiles)."""
    padded_rows, padded_rank = v.shape
    max_rank = b_rows.shape[1]
    rank_block = next_pow2(min(rank_block, max_rank))
    assert padded_rank % rank_block == 0, (padded_rank, rank_block)
    row_width = pool.shape[4]
    bo = _pow2_divisor(row_width, block_out)
    out_padded = b_rows.shape[2] * row_width
    kernel = functools.partial(_sgmv_expand_kernel, rank_block=rank_block, block_out=bo)
    return _pallas(
        kernel, grid=(tile_adapter.shape[0], out_padded // bo),
        in_specs=[whole_block((1,)), whole_block(tile_adapter.shape), whole_block(ranks.shape), whole_block(b_rows.shape),
                  pl.BlockSpec((block_tokens, padded_rank), lambda m, j: (m, 0)), whole_block(pool.shape)],
        out_spec=pl.BlockSpec((block_tokens, bo), lambda m, j: (m, j)),
        out_shape=jax.ShapeDtypeStruct((padded_rows, out_padded), _F32),
        args=(layer, tile_adapter, ranks, b_rows, v, pool), poison=poison, interpret=interpret,
        num_warps=num_warps, num_stages=num_stages, name="lora_sgmv_expand")


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------

def _prepare(x, pool, layer, a_rows, ranks, token_adapter):
    """Common argument normalisation: x zero-padded to whole pool rows (only when in_features is
    not a multiple of the row width; the pool's A chunks have zero tails to match)."""
    row_width = pool.shape[4]
    in_padded = a_rows.shape[2] * row_width
    if x.shape[1] != in_padded:
        x = jnp.pad(x, ((0, 0), (0, in_padded - x.shape[1])))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return x, layer, ranks.astype(jnp.int32), token_adapter.astype(jnp.int32)


def _combined(v, max_rank: int, b_max_rank: int, rank_block: int, combine_shrink):
    """The shrink [rows, padded R] after tensor parallelism's combine (reference.lora_delta):
    [rows, K x R] (share k's rank-rows at k x R, as the B tables expect), zero-padded to whole
    rank blocks of the expand. Without a combine, v as it is."""
    if combine_shrink is None:
        return v
    v = combine_shrink(v[:, :max_rank]).reshape(v.shape[0], -1)
    block = next_pow2(min(rank_block, b_max_rank))
    return jnp.pad(v, ((0, 0), (0, -v.shape[1] % block)))


def lora_delta_mbgmv(x, pool, layer, a_rows, b_rows, ranks, token_adapter, out_features, *, interpret=False,
                     rank_block=16, block_w=256, block_out=128, num_warps=4, num_stages=2, poison=False,
                     b_ranks=None, combine_shrink=None):
    """Decode variant (per-token gathers). Same convention as reference.lora_delta."""
    if a_rows.shape[0] == 0 or a_rows.shape[1] == 0:
        return jnp.zeros((x.shape[0], out_features), _F32)
    b_ranks = ranks if b_ranks is None else b_ranks
    x, layer, ranks, token_adapter = _prepare(x, pool, layer, a_rows, ranks, token_adapter)
    common = dict(num_warps=num_warps, num_stages=num_stages, interpret=interpret, poison=poison)
    v = mbgmv_shrink(x, pool, layer, a_rows.astype(jnp.int32), ranks, token_adapter, rank_block=rank_block,
                     block_w=block_w, **common)
    v = _combined(v, a_rows.shape[1], b_rows.shape[1], rank_block, combine_shrink)
    y = mbgmv_expand(v, pool, layer, b_rows.astype(jnp.int32), b_ranks.astype(jnp.int32), token_adapter,
                     block_out=block_out, **common)
    return y[:, :out_features]


def lora_delta_sgmv(x, pool, layer, a_rows, b_rows, ranks, token_adapter, out_features, *, interpret=False,
                    block_tokens=16, rank_block=16, block_w=64, block_out=64, num_warps=4, num_stages=2,
                    poison=False, b_ranks=None, combine_shrink=None):
    """Prefill variant (adapter segments, grouped matmuls). Same convention as reference.lora_delta."""
    if a_rows.shape[0] == 0 or a_rows.shape[1] == 0:
        return jnp.zeros((x.shape[0], out_features), _F32)
    b_ranks = ranks if b_ranks is None else b_ranks
    block_tokens = next_pow2(block_tokens)
    x, layer, ranks, token_adapter = _prepare(x, pool, layer, a_rows, ranks, token_adapter)
    tile_adapter, tile_tokens, padded_pos = segment_tiles(token_adapter, a_rows.shape[0], block_tokens)
    common = dict(block_tokens=block_tokens, rank_block=rank_block, num_warps=num_warps, num_stages=num_stages,
                  interpret=interpret, poison=poison)
    v = sgmv_shrink(x, pool, layer, a_rows.astype(jnp.int32), ranks, tile_adapter, tile_tokens, block_w=block_w,
                    **common)
    v = _combined(v, a_rows.shape[1], b_rows.shape[1], rank_block, combine_shrink)
    y = sgmv_expand(v, pool, layer, b_rows.astype(jnp.int32), b_ranks.astype(jnp.int32), tile_adapter,
                    block_out=block_out, **common)
    # Back to the original token order; tokens without an adapter get zeros.
    return jnp.where((token_adapter >= 0)[:, None], y[padded_pos, :out_features], 0.0)


def lora_delta(x, pool, layer, a_rows, b_rows, ranks, token_adapter, out_features, *, interpret=False,
               decode_max_tokens=DECODE_MAX_TOKENS, b_ranks=None, combine_shrink=None, **knobs):
    """reference.lora_delta's convention; MBGMV for T <= decode_max_tokens (decode batches), SGMV
    above (prefill). knobs: tuning keywords of the chosen variant (those the other does not take
    are dropped, so one knob dict can serve both)."""
    if x.shape[0] <= decode_max_tokens:
        fn, names = lora_delta_mbgmv, ("rank_block", "block_w", "block_out", "num_warps", "num_stages", "poison")
    else:
        fn, names = lora_delta_sgmv, ("block_tokens", "rank_block", "block_w", "block_out", "num_warps",
                                      "num_stages", "poison")
    return fn(x, pool, layer, a_rows, b_rows, ranks, token_adapter, out_features, interpret=interpret,
              b_ranks=b_ranks, combine_shrink=combine_shrink, **{k: v for k, v in knobs.items() if k in names})
