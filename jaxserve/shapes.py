"""The batch shapes a step may take: token buckets and LoRA tile options. Few shapes keep
compilation bounded (every one is compiled at start-up); fitting ones keep padding cheap."""
from __future__ import annotations

import numpy as np


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 48, 64, 96, 128, then powers of two (256, 512, ...), capped at max_tokens: fine
    steps where decode batches live (every padded token costs a full token of compute), coarse
    ones for prefill-heavy steps, so the compiled variants stay few."""
    sizes = {16, 32, 48, 64, 96, 128}
    n = 256
    while n < max_tokens:
        sizes.add(n)
        n *= 2
    return sorted(x for x in sizes if x < max_tokens) + [max(16, max_tokens)]


def lora_tile_size(num_tokens: int) -> int:
    """Tokens per LoRA tile: bigger tiles for bigger batches (fewer, better-shaped matmuls)."""
    return 16 if num_tokens >= 128 else 8


# What one LoRA tile's rank-rows cost to gather from the pool, in units of one token's matmul
# work in it (measured on the 2-core CPU: ~5 GB/s gathers against ~30 GFLOP/s small matmuls).
TILE_GATHER_COST = 12


def lora_tile_options(num_tokens: int, max_loras: int) -> list[tuple[int, int]]:
    """The (tile count, tile size) pairs compiled for a token bucket, smallest first: room for
    the tokens in full tiles plus 1 or 8 partial ones, then one that holds any batch — the bound
    T // size + min(max_loras, T) tiles, or T tiles of one token (each token reads its own
    adapter's rows, as MBGMV does) where that costs less: small batches of many adapters."""
    size = lora_tile_size(num_tokens)
    cap = min(num_tokens, num_tokens // size + min(max_loras, num_tokens))
    options = [(n, size) for n in sorted({min(cap, -(-num_tokens // size) + extra) for extra in (1, 8)})]
    per_token = num_tokens * (TILE_GATHER_COST + 1) < cap * (TILE_GATHER_COST + size)
    last = (num_tokens, 1) if per_token else (cap, size)
    return options + [last] if last != options[-1] else options


def lora_tiles_needed(lora_ids: np.ndarray, size: int) -> int:
    """Tiles of `size` tokens the batch's adapter segments fill (at least one)."""
    counts = np.bincount(lora_ids[lora_ids >= 0])
    return max(1, int((-(-counts // size)).sum()))
