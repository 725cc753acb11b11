"""The production XLA backend ("xla"): the default on CPU and TPU, and on GPU until the Pallas
kernels are measured faster there. It computes what reference.py specifies, organised for speed:

- `prepare` runs ONCE per step, outside the layer loop, and every layer reuses what it returns:
  each token's page list and context blocks, the fresh-key blocks, and the LoRA tiles.
- LoRA is grouped by adapter, not computed per token: tokens are sorted by adapter into tiles of
  `tile_size` tokens of one adapter (pallas/tiles.py); each tile reads its adapter's rank-rows from
  the pool once per layer and runs two small matmuls (shrink, expand); modules that share their
  input (q/k/v, gate/up) share one shrink. The cost grows with the
  tile count (about tokens / tile_size + distinct adapters), not with tokens x rank, and nothing
  is padded to the largest rank in memory. The tile count is static and chosen by the runner,
  which knows the batch (runner.lora_tile_plan), so a batch of 8 adapters does not pay for 32.
- Attention walks each token's cached context in blocks of pages under a while loop whose trip
  count is the longest context in the batch (no page-count shape bucket, no [tokens, max_len]
  copy), with an online softmax; the rows are cut into two static segments — the first
  `ctx_rows` (decode tokens and continuing prefill chunks, which the runner puts first) and the
  rest (new prompts, whose loop usually runs zero times) — so a step of fresh prompts gathers no
  context for them. The same online softmax then goes on over the batch's own new keys,
  block-diagonally: a sequence's new tokens are contiguous, so each block of FRESH_BLOCK query
  rows reads only the key blocks from its earliest sequence start to the diagonal (a packed step
  of short prompts costs a few [64, 64] blocks per query block instead of one [T, T]).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxserve.pallas.plan import StepPlan
from jaxserve.pallas.reference import gather_rank_rows
from jaxserve.pallas.tiles import segment_tiles

BLOCK_KEYS = 64       # cached keys each while-loop iteration reads per token (gathers dominate: keep tight)
FRESH_BLOCK = 64      # query rows (and new keys) per block of the batch's own keys
_NEG = -1e30          # a finite "minus infinity": exp(_NEG - _NEG) is 1, never NaN


def prepare(batch, lora, pool, plan: StepPlan) -> dict:
    """Per-step metadata shared by every layer (see the module docstring)."""
    num_tokens = batch.token_ids.shape[0]
    page_size = pool.shape[3]
    pages = batch.page_tables[batch.token_seq]                               # [T, max_pages]
    block = max(1, min(pages.shape[1], BLOCK_KEYS // page_size))
    pad = -pages.shape[1] % block
    if pad:
        pages = jnp.pad(pages, ((0, 0), (0, pad)))
    blocks = -(-batch.cached_lens // (block * page_size))                     # [T] blocks each token needs
    valid = batch.slot_mapping >= 0
    meta_fresh = _prepare_fresh(batch, valid, num_tokens)
    split = plan.ctx_rows if 0 < plan.ctx_rows < num_tokens else num_tokens
    segments = tuple((start, stop, jnp.max(blocks[start:stop], initial=0))
                     for start, stop in ((0, split), (split, num_tokens)) if stop > start)
    meta = {"pages": pages, "cached_lens": batch.cached_lens, "segments": segments, "block": block,
            "fresh": meta_fresh}
    if lora is not None and plan.lora_tiles:
        meta["lora"] = _prepare_lora(batch.lora_ids, lora, plan)
    return meta


def _prepare_fresh(batch, valid, num_tokens: int) -> dict:
    """The batch's own keys, in blocks of FRESH_BLOCK rows: a sequence's new tokens are contiguous,
    so query block b needs key blocks first_block[b]..b only (its earliest token's sequence start
    to the diagonal) — a packed batch of many short prompts costs a few blocks per query block,
    not [T, T]. Rows are padded to whole blocks; padding rows see only themselves."""
    size = min(FRESH_BLOCK, num_tokens)
    num_blocks = -(-num_tokens // size)
    pad = num_blocks * size - num_tokens
    index = jnp.arange(num_tokens)
    seq_start = index - jnp.where(valid, jnp.clip(batch.positions - batch.cached_lens, 0, index), 0)
    seq_start = jnp.pad(seq_start, (0, pad), constant_values=num_tokens)
    first_block = seq_start.reshape(num_blocks, size).min(1) // size
    blocks = jnp.arange(num_blocks)
    def padded(x, fill):
        return jnp.pad(x, (0, pad), constant_values=fill).reshape(num_blocks, size)
    return {"first_block": first_block, "trips": jnp.max(blocks - first_block) + 1,
            "query_seq": padded(batch.token_seq, -2), "key_seq": padded(jnp.where(valid, batch.token_seq, -1), -1),
            "positions": padded(batch.positions, 0)}


def _prepare_lora(lora_ids, lora, plan: StepPlan) -> dict:
    """Tiles of tokens by adapter and, per module, each tile's pool-row tables and live ranks."""
    num_adapters = next(iter(lora.values()))["rank"].shape[0]
    size, num_tiles = plan.tile_size, plan.lora_tiles
    tile_adapter, tile_tokens, padded_pos = segment_tiles(lora_ids, num_adapters, size, num_tiles)
    num_tokens = lora_ids.shape[0]
    which = jnp.maximum(tile_adapter, 0)
    modules = {}
    def live(rows, rank):                                                    # [tiles, R]
        return jnp.arange(rows.shape[1])[None, :] < jnp.where(tile_adapter >= 0, rank[which], 0)[:, None]

    for name, t in lora.items():
        modules[name] = {"a_rows": t["a_rows"][which], "b_rows": t["b_rows"][which],
                         "live": live(t["a_rows"], t["rank"]), "b_live": live(t["b_rows"], t["b_rank"])}
    return {
        # padded row -> token (num_tokens: padding, read as zeros); token -> padded row (past the
        # end: no adapter, read as zeros)
        "tile_tokens": jnp.where(tile_tokens >= 0, tile_tokens, num_tokens),
        "token_rows": jnp.where(lora_ids >= 0, padded_pos, num_tiles * size),
        "modules": modules,
    }


def lora_deltas(x, pool, layer, meta, modules: tuple[str, ...], out_features: tuple[int, ...], combine_shrink=None):
    """For modules that share the input x (q/k/v; gate/up): y_m[t] = (x[t] A_s^T) B_s for the
    token's adapter s, 0 for tokens without one; a tuple of [T, out_m] float32. One tile gather
    of x and ONE shrink matmul over the modules' rank-rows side by side (under tensor
    parallelism one collective for them all), then one expand each."""
    tiles, ts = meta["lora"], [meta["lora"]["modules"][m] for m in modules]
    num_tiles = ts[0]["live"].shape[0]
    xt = jnp.take(x, tiles["tile_tokens"], axis=0, mode="fill", fill_value=0)
    xt = xt.reshape(num_tiles, -1, x.shape[-1])                                          # [M, G, in]
    a_rows = jnp.concatenate([t["a_rows"] for t in ts], axis=1)                          # [M, sum R, ca]
    live = jnp.concatenate([t["live"] for t in ts], axis=1)
    a = gather_rank_rows(pool, layer, a_rows, x.shape[-1]).astype(x.dtype)              # [M, sum R, in]
    shrunk = jnp.einsum("mgi,mri->mgr", xt, a, preferred_element_type=jnp.float32)
    shrunk = jnp.where(live[:, None, :], shrunk, 0.0)  # rank-rows past a rank may hold anything
    if combine_shrink is None:
        shrunk = shrunk[..., None, :]                                                     # [M, G, 1, sum R]
    else:  # TP's collective on token rows: a batch of distinct adapters pads its tiles up to 5x
        rows = jnp.take(shrunk.reshape(-1, shrunk.shape[-1]), tiles["token_rows"], axis=0, mode="fill", fill_value=0)
        rows = combine_shrink(rows)                                                       # [T, K, sum R]
        shrunk = jnp.take(rows, tiles["tile_tokens"], axis=0, mode="fill", fill_value=0)
        shrunk = shrunk.reshape(num_tiles, -1, *rows.shape[1:])                          # [M, G, K, sum R]
    outs, start = [], 0
    for t, width in zip(ts, out_features):
        rank = t["live"].shape[1]
        own = shrunk[..., start:start + rank].reshape(*shrunk.shape[:2], -1)              # [M, G, K x R]
        b = gather_rank_rows(pool, layer, t["b_rows"], width)                            # [M, K x R, out]
        b = jnp.where(t["b_live"][..., None], b, 0).astype(jnp.float32)
        out = jnp.einsum("mgr,mro->mgo", own, b, preferred_element_type=jnp.float32)
        outs.append(jnp.take(out.reshape(-1, width), tiles["token_rows"], axis=0, mode="fill", fill_value=0))
        start += rank
    return tuple(outs)


def paged_attention(q, k_new, v_new, pool, layer, meta, scale):
    """Same result as reference.paged_attention; q [T, H, D] -> [T, H, D] in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = pool.shape[4] // head_dim
    qg = q.reshape(num_tokens, kv_heads, num_heads // kv_heads, head_dim)
    kn = k_new.reshape(num_tokens, kv_heads, head_dim)
    vn = v_new.reshape(num_tokens, kv_heads, head_dim)
    # The cached context, segment by segment; then the batch's own keys continue the same
    # online softmax.
    parts = [_cached(qg[a:b], pool, layer, meta["pages"][a:b], meta["cached_lens"][a:b], trips, meta["block"],
                     scale) for a, b, trips in meta["segments"]]
    carry = tuple(jnp.concatenate(xs) if len(xs) > 1 else xs[0] for xs in zip(*parts))
    _, l, acc = _fresh(qg, kn, vn, meta["fresh"], carry, scale)
    out = acc / l[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def _online_softmax_step(carry, s, v, pv: str):
    """One block of keys into the running (max, sum, weighted values): s the block's masked scores
    (keys last), pv the einsum of probabilities x values."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum(pv, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc


def _cached(qg, pool, layer, pages, cached_lens, trips, block: int, scale):
    """Online softmax of qg [R, K, G, D] over each row's cached keys (positions < cached_len),
    `block` pages per iteration, `trips` iterations: returns (max, sum, weighted values)."""
    rows, kv_heads, group, head_dim = qg.shape
    page_size = pool.shape[3]
    keys_per_block = block * page_size

    def step(i, carry):
        blk = lax.dynamic_slice_in_dim(pages, i * block, block, axis=1)              # [R, block]
        k = pool[layer, 0, blk].reshape(rows, keys_per_block, kv_heads, head_dim)
        v = pool[layer, 1, blk].reshape(rows, keys_per_block, kv_heads, head_dim)
        s = jnp.einsum("rkgd,rlkd->rkgl", qg, k, preferred_element_type=jnp.float32) * scale
        visible = (i * keys_per_block + jnp.arange(keys_per_block))[None, :] < cached_lens[:, None]
        return _online_softmax_step(carry, jnp.where(visible[:, None, None, :], s, -jnp.inf), v, "rkgl,rlkd->rkgd")

    init = (jnp.full((rows, kv_heads, group), _NEG, jnp.float32), jnp.zeros((rows, kv_heads, group), jnp.float32),
            jnp.zeros((rows, kv_heads, group, head_dim), jnp.float32))
    return lax.fori_loop(0, trips, step, init)


def _fresh(qg, kn, vn, fresh, carry, scale):
    """Continue the online softmax carry (max, sum, weighted values per row) over the batch's
    own keys, block-diagonally (see _prepare_fresh): iteration j gives each query block b the key
    block b - j, masked to the query's sequence and causal order."""
    num_tokens, kv_heads, group, head_dim = qg.shape
    num_blocks, size = fresh["query_seq"].shape
    pad = num_blocks * size - num_tokens

    def blocked(x):
        return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(num_blocks, size, *x.shape[1:])

    qb, kb, vb = blocked(qg), blocked(kn), blocked(vn)
    blocks = jnp.arange(num_blocks)
    diagonal = jnp.eye(size, dtype=bool)

    def step(j, carry):
        kblock = blocks - j
        source = jnp.maximum(kblock, 0)
        k, v = kb[source], vb[source]                                                # [B, size, K, D]
        s = jnp.einsum("bqkgd,bukd->bqkgu", qb, k, preferred_element_type=jnp.float32) * scale
        visible = ((fresh["key_seq"][source][:, None, :] == fresh["query_seq"][:, :, None])
                   & (fresh["positions"][source][:, None, :] <= fresh["positions"][:, :, None])
                   & (kblock >= fresh["first_block"])[:, None, None])
        visible |= diagonal & (j == 0)  # every row sees itself: a padding row is never empty
        return _online_softmax_step(carry, jnp.where(visible[:, :, None, None, :], s, -jnp.inf), v,
                                    "bqkgu,bukd->bqkgd")

    m, l, acc = lax.fori_loop(0, fresh["trips"], step, tuple(blocked(x) for x in carry))
    return tuple(x.reshape(num_blocks * size, *x.shape[2:])[:num_tokens] for x in (m, l, acc))
