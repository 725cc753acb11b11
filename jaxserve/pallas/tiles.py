"""Grouping tokens by adapter into fixed-size tiles: the shared step of the grouped LoRA ops
(the Pallas SGMV kernel and the XLA backend's tiled matmuls)."""
from __future__ import annotations

import jax.numpy as jnp


def segment_tiles(token_adapter, num_adapters: int, block_tokens: int, num_tiles: int | None = None):
    """Group tokens by adapter into tiles of block_tokens rows, all with static shapes.

    Tokens are stably sorted by adapter (no-adapter tokens last, then dropped); each adapter's
    segment starts a new tile and is padded to a whole number of tiles. With T tokens and n
    adapters at most T // block_tokens + min(n, T) tiles are needed (each non-empty segment wastes
    at most one partial tile), the static tile count M — unless the caller, who knows the batch,
    passes a smaller M that still holds every tile (tokens past it would be dropped).

    Returns (tile_adapter [M] int32: adapter of each tile, -1 for unused tiles;
             tile_tokens [M * block_tokens] int32: original token of each padded row, -1 for padding;
             padded_pos [T] int32: padded row of each token (0 for tokens without an adapter)).
    """
    num_tokens = token_adapter.shape[0]
    n, bt = num_adapters, block_tokens
    if num_tiles is None:
        num_tiles = max(1, num_tokens // bt + min(n, num_tokens))
    key = jnp.where(token_adapter >= 0, token_adapter, n).astype(jnp.int32)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.zeros((n + 1,), jnp.int32).at[key].add(1)[:n]
    tiles = (counts + bt - 1) // bt
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    token_start = jnp.cumsum(counts) - counts
    sorted_key = key[order]
    grouped = sorted_key < n
    g = jnp.minimum(sorted_key, n - 1)
    pos = tile_start[g] * bt + jnp.arange(num_tokens, dtype=jnp.int32) - token_start[g]
    pos = jnp.where(grouped, pos, num_tiles * bt)                       # dropped below
    tile_tokens = jnp.full((num_tiles * bt,), -1, jnp.int32).at[pos].set(order, mode="drop")
    padded_pos = jnp.zeros((num_tokens,), jnp.int32).at[order].set(jnp.where(grouped, pos, 0))
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    which = jnp.sum(tile[:, None] >= tile_end[None, :], axis=1, dtype=jnp.int32)
    tile_adapter = jnp.where(which < n, which, -1).astype(jnp.int32)
    return tile_adapter, tile_tokens, padded_pos
