"""Pure-XLA reference implementations of jaxserve's kernels.

They are the spec: a Pallas kernel registered in ops.py must compute the same thing with the same
calling convention. They favour clarity over speed (per-token gathers, no tiling).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def paged_attention(q, k_pages, v_pages, page_tables, token_seq, positions, scale):
    """Causal attention of a flat ragged batch of query tokens over a paged KV cache.

    q:           [T, num_heads, head_dim]  queries, any mix of prefill chunks and decode tokens
    k_pages:     [num_pages, page_size, num_kv_heads * head_dim]   one layer's key pages
    v_pages:     same shape, value pages
    page_tables: [S, max_pages] int32, page ids of each sequence in order
    token_seq:   [T] int32, row of page_tables that each query token belongs to
    positions:   [T] int32, the token's position; it attends to keys 0..position of its sequence
                 (the cache already holds this step's keys: the forward writes before it reads)
    returns      [T, num_heads, head_dim] in q's dtype
    """
    num_tokens, num_heads, head_dim = q.shape
    page_size = k_pages.shape[1]
    num_kv_heads = k_pages.shape[2] // head_dim
    group = num_heads // num_kv_heads
    pages = page_tables[token_seq]                                   # [T, max_pages]
    max_len = pages.shape[1] * page_size
    k = k_pages[pages].reshape(num_tokens, max_len, num_kv_heads, head_dim)
    v = v_pages[pages].reshape(num_tokens, max_len, num_kv_heads, head_dim)
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("tkgd,tlkd->tkgl", qg, k, preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(max_len)[None, :] <= positions[:, None]    # [T, L]
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgl,tlkd->tkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def lora_delta(x, lora_a, lora_b, token_slots):
    """Heterogeneous multi-LoRA: y[t] = (x[t] A_s^T) B_s for s = token_slots[t], 0 where s < 0.

    x:           [T, in_features]
    lora_a:      [num_slots, max_rank, in_features]   rank-rows of A (rows past an adapter's rank are 0)
    lora_b:      [num_slots, max_rank, out_features]  rank-rows of B^T with the scaling folded in
    token_slots: [T] int32, adapter slot of each token, -1 for none
    returns      [T, out_features] float32
    """
    has_adapter = token_slots >= 0
    slots = jnp.where(has_adapter, token_slots, 0)
    shrunk = jnp.einsum("ti,tri->tr", x, lora_a[slots], preferred_element_type=jnp.float32)
    shrunk = jnp.where(has_adapter[:, None], shrunk, 0.0)
    return jnp.einsum("tr,tro->to", shrunk, lora_b[slots].astype(jnp.float32))
