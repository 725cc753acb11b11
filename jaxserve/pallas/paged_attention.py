"""Pallas paged attention (flash-decoding over the unified pool), GPU lowering through Triton.

Same calling convention and semantics as `reference.paged_attention` (the spec); see its docstring.

Design
------
Grid (token, kv_head, split) with splits 0..num_splits-1 over the token's cached pages and one
extra split (index num_splits) over the token's fresh keys, i.e. this step's k_new/v_new rows of
its own sequence. Every program keeps an online softmax (running max m, running sum l, unnormalised
f32 output o) over its keys and writes (o, m, l); a small XLA log-sum-exp combine merges the
num_splits + 1 partials per (token, kv_head). Giving the fresh keys their own split keeps every
program's work one uniform loop (a dynamic-bound `fori_loop`; the other loop has zero trips) and
lets the fresh part run in parallel with the page splits. (Cost note: a long prefill chunk makes
the fresh split of its late tokens the longest program, O(chunk) keys; fine for chunked prefill
with a token budget, and the obvious place to split further if a profile says so.)

* Page split s reads the row page_tables[token_seq[t]][s*pps:(s+1)*pps] (pps = pages_per_split),
  stops at the last page holding keys < cached_len (so splits past a short context run zero
  iterations), and gathers each page straight out of the whole pool by page id:
  pool[layer, 0|1, page, :, kv_head*D:(kv_head+1)*D]. Keys at positions >= cached_len are masked.
* The fresh split reads k_new rows [t - (positions[t] - cached_lens[t]), t] (a sequence's chunk is
  contiguous in the batch; padding queries use the window [t, t]), 16 rows at a time, and masks
  them exactly like the reference does: same sequence, position <= the query's, valid; and the
  query token always sees itself, so no row is all-masked and padding never yields NaN.

Triton lowering constraints:
* no scalar prefetch, no scratch: the pool, page tables, per-token metadata and the layer index
  (a [1] array, it is traced inside the model's layer scan) are passed whole (a BlockSpec over
  the whole array, like jax.experimental.pallas.ops.gpu.paged_attention) and indexed inside; the
  online-softmax state lives in loop carries (registers).
* every loaded/computed tensor has power-of-two dims; tl.dot needs M, N, K >= 16. The GQA group
  (1/3/4/8 query heads per KV head) is zero-padded in XLA to G_pad = max(16, next_pow2(group))
  and the scores use tt.dot (tensor cores). We chose padding over broadcast-multiply-and-sum:
  the latter materialises a [group, block_k, head_dim] f32 product in registers (16x32x128x4 B =
  256 KiB per program: spills), while padding M only costs tensor-core flops that a memory-bound
  decode does not miss (jax's own GPU paged attention does the same: block_h % 16 == 0).
  The key block is max(16, page_size) rows: page sizes below 16 load several pages per step
  (a vector gather through the page table, then a reshape to [block_k, head_dim]).
  page_size and head_dim must be powers of two. Fresh keys come 16 rows at a time from k_new
  padded by 16 rows in XLA, so no load is out of bounds and no masked load is needed.
* accumulation in float32 (the dots return f32; f32 inputs use precision=HIGHEST, i.e. no TF32,
  to match the reference); the probabilities are cast to the value dtype for the P@V dot as the
  reference does; the output is cast to q's dtype after the combine.

The Triton backend selection and its deprecation-warning filter live in triton_backend.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxserve.pallas.triton_backend import compiler_params, next_pow2, quiet, whole_block

FRESH_BLOCK = 16     # fresh-key rows per loop step (tl.dot N >= 16)
MIN_BLOCK = 16       # minimum key rows / padded query rows of a dot
KEYS_PER_SPLIT = 256  # default split size: a 2k-token decode runs in 8 programs per KV head
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked block never yields NaN


def _dot(a, b, b_contract, precision):
    """a [M, K] x b (K on axis b_contract) -> [M, N] float32 (tt.dot). lax.dot_general rather than
    pl.dot, which jax 0.12 removed; it is what pl.dot / plgpu.dot lower to."""
    return lax.dot_general(a, b, (((1,), (b_contract,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def default_pages_per_split(page_size: int) -> int:
    """About KEYS_PER_SPLIT keys per split, at least one key block."""
    return max(max(1, MIN_BLOCK // page_size), KEYS_PER_SPLIT // page_size)


def _kernel(layer_ref, scale_ref, meta_ref, tables_ref, q_ref, k_new_ref, v_new_ref, pool_ref, *rest,
            page_size, pages_per_block, pages_per_split, num_splits, head_dim, precision):
    o_ref, m_ref, l_ref = rest[-3:]  # leading refs (if any) are the aliased poison inputs
    t, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    scale = scale_ref[0]
    seq = meta_ref[0, t]
    pos = meta_ref[1, t]
    cached = meta_ref[3, t]
    fresh_start = meta_ref[4, t]
    cols = pl.ds(h * head_dim, head_dim)
    q = q_ref[...]                                                    # [G_pad, D]
    g_pad = q.shape[0]

    def update(carry, k, v, mask):
        o, m, l = carry
        k = k.astype(q.dtype)
        s = _dot(q, k, 1, precision) * scale                          # [G_pad, block] f32
        s = jnp.where(mask[None, :], s, MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp(m - m_next)                              # exp(-inf) = 0 on the first block
        p = jnp.where(mask[None, :], jnp.exp(s - m_next[:, None]), 0.0)
        l_next = l * correction + p.sum(axis=-1)
        o_next = o * correction[:, None] + _dot(p.astype(v.dtype), v, 0, precision)
        return o_next, m_next, l_next

    block_k = pages_per_block * page_size

    def page_block(b, carry):
        page0 = split * pages_per_split + b * pages_per_block
        if pages_per_block == 1:
            page = tables_ref[seq, page0]
            k = pool_ref[layer, 0, page, :, cols]                    # [page_size, D]
            v = pool_ref[layer, 1, page, :, cols]
        else:  # pages smaller than a dot: gather several pages by id
            pages = tables_ref[seq, pl.ds(page0, pages_per_block)]
            k = pool_ref[layer, 0, pages, :, cols].reshape(block_k, head_dim)
            v = pool_ref[layer, 1, pages, :, cols].reshape(block_k, head_dim)
        key_pos = page0 * page_size + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        return update(carry, k, v, key_pos < cached)

    def fresh_block(b, carry):
        row0 = fresh_start + b * FRESH_BLOCK
        rows = pl.ds(row0, FRESH_BLOCK)
        k = k_new_ref[rows, cols]                                    # [16, D]
        v = v_new_ref[rows, cols]
        key_seq, key_pos, key_valid = meta_ref[0, rows], meta_ref[1, rows], meta_ref[2, rows]
        idx = row0 + lax.broadcasted_iota(jnp.int32, (FRESH_BLOCK,), 0)
        mask = ((key_seq == seq) & (key_pos <= pos) & (key_valid != 0)) | (idx == t)
        return update(carry, k, v, mask)

    is_fresh = split == num_splits
    first_page = split * pages_per_split
    end_page = jnp.minimum(first_page + pages_per_split, (cached + page_size - 1) // page_size)
    page_blocks = jnp.where(is_fresh, 0, jnp.maximum(end_page - first_page, 0))
    page_blocks = (page_blocks + pages_per_block - 1) // pages_per_block
    fresh_blocks = jnp.where(is_fresh, (t - fresh_start + FRESH_BLOCK) // FRESH_BLOCK, 0)

    carry = (jnp.zeros((g_pad, head_dim), jnp.float32),
             jnp.full((g_pad,), -jnp.inf, jnp.float32),
             jnp.zeros((g_pad,), jnp.float32))
    carry = lax.fori_loop(0, page_blocks, page_block, carry)
    o, m, l = lax.fori_loop(0, fresh_blocks, fresh_block, carry)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def paged_attention_partials(q, k_new, v_new, pool, layer, page_tables, token_seq, positions, cached_lens,
                             valid, scale, *, interpret=False, pages_per_split=None, num_warps=4,
                             num_stages=2, poison=False):
    """The kernel alone: per-split unnormalised outputs o [T, KV, splits+1, G_pad, D] and their
    running max m / sum l [T, KV, splits+1, G_pad] (float32; the last split is the fresh keys).
    poison=True (tests) starts the outputs as NaN through input_output_aliases, so a block the
    kernel failed to write shows up."""
    num_tokens, num_heads, head_dim = q.shape
    num_layers, _, num_pages, page_size, row_width = pool.shape
    num_kv_heads = row_width // head_dim
    group = num_heads // num_kv_heads
    if num_kv_heads * head_dim != row_width or group * num_kv_heads != num_heads:
        raise ValueError(f"q heads {num_heads} x {head_dim} do not fit pool rows of width {row_width}")
    for name, n in (("page_size", page_size), ("head_dim", head_dim)):
        if n & (n - 1):
            raise ValueError(f"{name}={n} must be a power of two (Triton block shapes)")
    pages_per_block = max(1, MIN_BLOCK // page_size)
    if pages_per_split is None:
        pages_per_split = default_pages_per_split(page_size)
    if pages_per_split % pages_per_block:
        raise ValueError(f"pages_per_split={pages_per_split} must be a multiple of {pages_per_block} "
                         f"(a dot needs >= {MIN_BLOCK} keys of page size {page_size})")
    g_pad = max(MIN_BLOCK, next_pow2(group))
    compute_dtype = jnp.promote_types(q.dtype, pool.dtype)

    max_pages = page_tables.shape[1]
    num_splits = max(1, -(-max_pages // pages_per_split))
    page_tables = page_tables.astype(jnp.int32)
    if max_pages % pages_per_block:  # the last multi-page block must stay inside the row
        page_tables = jnp.pad(page_tables, ((0, 0), (0, pages_per_block - max_pages % pages_per_block)))

    qg = q.astype(compute_dtype).reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, g_pad - group), (0, 0)))
    pad_rows = ((0, FRESH_BLOCK), (0, 0))  # fresh blocks may run up to 15 rows past the last token
    k_new = jnp.pad(k_new.astype(pool.dtype), pad_rows)
    v_new = jnp.pad(v_new.astype(pool.dtype), pad_rows)
    token_seq, positions, cached_lens = (jnp.asarray(a, jnp.int32) for a in (token_seq, positions, cached_lens))
    valid = jnp.asarray(valid, bool)
    index = jnp.arange(num_tokens, dtype=jnp.int32)
    # Fresh keys of token t: the rows of its chunk up to itself (chunks are contiguous); a padding
    # query only sees itself.
    fresh_start = index - jnp.where(valid, jnp.clip(positions - cached_lens, 0, index), 0)
    meta = jnp.stack([token_seq, positions, valid.astype(jnp.int32), cached_lens, fresh_start])
    meta = jnp.pad(meta, ((0, 0), (0, FRESH_BLOCK)))  # padded rows: valid 0, never a key
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    scale = jnp.asarray(scale, jnp.float32).reshape(1)

    grid = (num_tokens, num_kv_heads, num_splits + 1)
    out_shape = [jax.ShapeDtypeStruct((num_tokens, num_kv_heads, num_splits + 1, g_pad, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((num_tokens, num_kv_heads, num_splits + 1, g_pad), jnp.float32),
                 jax.ShapeDtypeStruct((num_tokens, num_kv_heads, num_splits + 1, g_pad), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, g_pad, head_dim), lambda t, h, s: (t, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, g_pad), lambda t, h, s: (t, h, s, 0)),
                 pl.BlockSpec((None, None, None, g_pad), lambda t, h, s: (t, h, s, 0))]
    inputs = [layer, scale, meta, page_tables, qg, k_new, v_new, pool]
    in_specs = [whole_block(x.shape) for x in inputs]
    in_specs[4] = pl.BlockSpec((None, None, g_pad, head_dim), lambda t, h, s: (t, h, 0, 0))
    aliases = {}
    if poison:
        for i, shape in enumerate(out_shape):
            aliases[len(inputs)] = i
            inputs.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
            in_specs.append(out_specs[i])
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, page_size=page_size, pages_per_block=pages_per_block,
                               pages_per_split=pages_per_split, num_splits=num_splits, head_dim=head_dim,
                               precision=precision)
    call = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages),
        name=f"paged_attention_ps{page_size}_g{g_pad}_d{head_dim}_pps{pages_per_split}")
    with quiet():  # un-jitted calls lower right here
        return call(*inputs)


def combine_partials(o, m, l, num_heads, dtype):
    """Log-sum-exp merge of the splits: [T, KV, splits, G_pad, ...] -> [T, num_heads, D] in dtype."""
    num_tokens, num_kv_heads, _, _, head_dim = o.shape
    m_all = m.max(axis=2, keepdims=True)            # finite: the fresh split always has the query itself
    weight = jnp.exp(m - m_all)                     # splits without keys have m = -inf: weight 0
    total = (weight * l).sum(axis=2)
    out = (weight[..., None] * o).sum(axis=2) / total[..., None]
    group = num_heads // num_kv_heads
    return out[:, :, :group].reshape(num_tokens, num_heads, head_dim).astype(dtype)


def paged_attention(q, k_new, v_new, pool, layer, page_tables, token_seq, positions, cached_lens, valid, scale,
                    *, interpret=False, pages_per_split=None, num_warps=4, num_stages=2, poison=False):
    """Pallas (Triton on GPU, interpret=True on CPU) version of reference.paged_attention.

    pages_per_split: pages per kv split (default: about 256 keys); num_warps/num_stages: Triton
    compiler parameters; poison: test-only, see paged_attention_partials. A padding query's row is
    finite (it attends to itself only) but need not equal the reference's row."""
    o, m, l = paged_attention_partials(q, k_new, v_new, pool, layer, page_tables, token_seq, positions,
                                       cached_lens, valid, scale, interpret=interpret,
                                       pages_per_split=pages_per_split, num_warps=num_warps,
                                       num_stages=num_stages, poison=poison)
    return combine_partials(o, m, l, q.shape[1], q.dtype)


__all__ = ["paged_attention", "paged_attention_partials", "combine_partials", "default_pages_per_split"]
