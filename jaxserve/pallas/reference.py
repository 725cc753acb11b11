"""Pure-XLA reference implementations of jaxserve's kernels.

They are the spec: a Pallas kernel registered in ops.py must compute the same thing with the same
calling convention. They favour clarity over speed (per-token gathers, no tiling).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def paged_attention(q, k_new, v_new, pool, layer, page_tables, token_seq, positions, cached_lens, valid, scale):
    """Causal attention of a flat ragged batch of query tokens over the paged KV cache plus the
    batch's own new keys (the forward writes them to the pool after all layers ran, so the pool
    is read-only inside the layer loop).

    q:           [T, num_heads, head_dim]  queries, any mix of prefill chunks and decode tokens
    k_new/v_new: [T, num_kv_heads * head_dim] this step's keys/values (in the pool's dtype)
    pool:        [L, 2, num_pages, page_size, num_kv_heads * head_dim], the unified pool (half 0
                 keys, half 1 values of KV pages)
    layer:       int32 scalar, the layer being computed
    page_tables: [S, max_pages] int32, page ids of each sequence in order
    token_seq:   [T] int32, row of page_tables that each token belongs to
    positions:   [T] int32, the token's position in its sequence
    cached_lens: [T] int32, how many of its sequence's tokens the pool already holds (keys at
                 positions < cached_len come from the pool, the rest from this batch)
    valid:       [T] bool, False for padding tokens (never a key)
    returns      [T, num_heads, head_dim] in q's dtype
    """
    num_tokens, num_heads, head_dim = q.shape
    page_size = pool.shape[3]
    num_kv_heads = pool.shape[4] // head_dim
    group = num_heads // num_kv_heads
    pages = page_tables[token_seq]                                   # [T, max_pages]
    max_len = pages.shape[1] * page_size
    # Only the pages the batch needs are gathered (slicing a layer of a large pool would copy it).
    k = pool[layer, 0, pages].reshape(num_tokens, max_len, num_kv_heads, head_dim)
    v = pool[layer, 1, pages].reshape(num_tokens, max_len, num_kv_heads, head_dim)
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    cached = jnp.einsum("tkgd,tlkd->tkgl", qg, k, preferred_element_type=jnp.float32) * scale
    cached_visible = jnp.arange(max_len)[None, :] < cached_lens[:, None]                # [T, L]
    cached = jnp.where(cached_visible[:, None, None, :], cached, -jnp.inf)
    kn = k_new.reshape(num_tokens, num_kv_heads, head_dim)
    vn = v_new.reshape(num_tokens, num_kv_heads, head_dim)
    fresh = jnp.einsum("tkgd,ukd->tkgu", qg, kn, preferred_element_type=jnp.float32) * scale
    fresh_visible = ((token_seq[:, None] == token_seq[None, :]) & (positions[None, :] <= positions[:, None])
                     & valid[None, :])                                                   # [T, T]
    # A padding token sees itself, so no row is all -inf: its softmax would be NaN, and a NaN
    # value row poisons every row through 0 * NaN in the next layer.
    fresh_visible |= jnp.eye(num_tokens, dtype=bool)
    fresh = jnp.where(fresh_visible[:, None, None, :], fresh, -jnp.inf)
    probs = jax.nn.softmax(jnp.concatenate([cached, fresh], axis=-1), axis=-1)
    out = (jnp.einsum("tkgl,tlkd->tkgd", probs[..., :max_len].astype(v.dtype), v, preferred_element_type=jnp.float32)
           + jnp.einsum("tkgu,ukd->tkgd", probs[..., max_len:].astype(vn.dtype), vn, preferred_element_type=jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def gather_rank_rows(pool, layer, rows, width):
    """Adapter rank-rows from the unified pool: rows [..., R, chunks] flat row ids of one layer
    (r = (half * num_pages + page) * page_size + offset) -> [..., R, width] (chunks joined)."""
    _, _, num_pages, page_size, row_width = pool.shape
    # Index the pool directly: a reshape of the loop-carried pool would copy all of it.
    half_page, offset = rows // page_size, rows % page_size
    gathered = pool[layer, half_page // num_pages, half_page % num_pages, offset]   # [..., R, c, W]
    return gathered.reshape(*rows.shape[:-1], rows.shape[-1] * row_width)[..., :width]


def lora_delta(x, pool, layer, a_rows, b_rows, ranks, token_adapter, out_features, b_ranks=None,
               combine_shrink=None):
    """Heterogeneous multi-LoRA read straight from the unified pool:
    y[t] = (x[t] A_s^T) B_s for s = token_adapter[t], 0 where s < 0.

    x:             [T, in_features]
    pool:          [L, 2, num_pages, page_size, row_width], KV and adapter pages alike
    layer:         int32 scalar, the layer being computed
    a_rows:        [n, R, chunks(in)] flat pool rows of each active adapter's A rank-rows
    b_rows:        [n, Rb, chunks(out)] likewise for B^T (scaling folded in); Rb = R unless
                   combine_shrink gathers shares of the rank (then Rb = K x R)
    ranks:         [n] int32; rank-rows at or past an adapter's rank are ignored (R = max rank)
    token_adapter: [T] int32, index into the n active adapters, -1 for none
    b_ranks:       [n] int32, the expand's rank (B^T's rows read); default `ranks`
    combine_shrink: tensor parallelism's communication: maps the [..., R] shrink to [..., K, R]
                   before the expand — an all-reduce of partial sums (K = 1: each device holds a
                   slice of A's inputs) or an all-gather of the K devices' rank shares
    returns        [T, out_features] float32

    Each token gathers its own adapter's rows from the pool (as MBGMV does), so the cost does not
    grow with the number of distinct adapters in the batch.
    """
    has_adapter = token_adapter >= 0
    which = jnp.where(has_adapter, token_adapter, 0)
    live = (jnp.arange(a_rows.shape[1])[None, :] < ranks[which][:, None]) & has_adapter[:, None]  # [T, R]
    a = gather_rank_rows(pool, layer, a_rows[which], x.shape[-1])                                 # [T, R, in]
    shrunk = jnp.einsum("ti,tri->tr", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    shrunk = jnp.where(live, shrunk, 0.0)  # rows past the rank may hold any other page's data
    if combine_shrink is not None:
        shrunk = combine_shrink(shrunk).reshape(shrunk.shape[0], -1)                              # [T, Rb]
    b_ranks = ranks if b_ranks is None else b_ranks
    b_live = (jnp.arange(b_rows.shape[1])[None, :] < b_ranks[which][:, None]) & has_adapter[:, None]
    b = gather_rank_rows(pool, layer, b_rows[which], out_features)                                # [T, Rb, out]
    return jnp.einsum("tr,tro->to", shrunk, jnp.where(b_live[..., None], b, 0).astype(jnp.float32))
