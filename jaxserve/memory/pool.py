"""The unified page pool (S-LoRA's Unified Paging), host side: ONE free list of fixed-size pages
handed to two kinds of owner — a sequence's KV cache and an adapter's weights.

The device side is one array [L, 2, num_pages, page_size, row_width] (memory/device_pool.py):
page p is the same page in every layer, so one page id serves a sequence's KV for all layers or a
slice of an adapter for all layers. This class only accounts; it never touches the device.

`adapter_pages=N` splits the pool into two regions, adapters only in pages [0, N) and KV in the
rest: the separate-memory designs S-LoRA's ablation and vLLM's fixed slots stand for, kept only
as benchmark baselines (EngineConfig.adapter_memory).
"""
from __future__ import annotations

import numpy as np

KV, ADAPTER = "kv", "adapter"


class PoolFull(MemoryError):
    """The pool cannot supply the pages asked for: wait, evict or reject — never overwrite."""


def page_bytes(num_layers: int, page_size: int, row_width: int, dtype) -> int:
    """Bytes of one page across all layers and both halves (K and V, or two adapter half-pages)."""
    return num_layers * 2 * page_size * row_width * np.dtype(dtype).itemsize


class PagePool:
    def __init__(self, num_pages: int, page_size: int, adapter_pages: int | None = None):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a pool needs >= 1 page of >= 1 row; got {num_pages} pages of {page_size}")
        if adapter_pages is not None and not 1 <= adapter_pages < num_pages:
            raise ValueError(f"adapter_pages={adapter_pages} is invalid; allowed: None (one unified pool) or 1 to "
                             f"{num_pages - 1} (a region of the {num_pages} pages, the rest for KV)")
        self.num_pages, self.page_size = num_pages, page_size
        self.unified = adapter_pages is None
        # Each kind's region -> its free list; both kinds share one list when unified. Pop from
        # the end: low page ids are handed out first, which keeps tests readable.
        if self.unified:
            shared = list(range(num_pages - 1, -1, -1))
            self._free = {KV: shared, ADAPTER: shared}
        else:
            self._free = {ADAPTER: list(range(adapter_pages - 1, -1, -1)),
                          KV: list(range(num_pages - 1, adapter_pages - 1, -1))}
        self._capacity = {KV: num_pages - (adapter_pages or 0), ADAPTER: adapter_pages or num_pages}
        self._owner: list[tuple[str, object] | None] = [None] * num_pages
        self._used = {KV: 0, ADAPTER: 0}

    @property
    def num_free(self) -> int:
        return len(self._free[KV]) + (0 if self.unified else len(self._free[ADAPTER]))

    def free_for(self, kind: str) -> int:
        """Free pages that `kind` may take (all free pages when unified)."""
        return len(self._free[kind])

    def capacity(self, kind: str) -> int:
        """Pages `kind` could ever hold (the whole pool when unified)."""
        return self._capacity[kind]

    def num_used(self, kind: str) -> int:
        return self._used[kind]

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def owner_of(self, page: int) -> tuple[str, object] | None:
        return self._owner[page]

    def allocate(self, num_pages: int, kind: str, owner) -> list[int]:
        free = self._free[kind]
        if num_pages > len(free):
            raise PoolFull(f"asked for {num_pages} pages for {kind} {owner!r}; {len(free)} of "
                           f"{self._capacity[kind]} are free")
        taken = free[len(free) - num_pages:][::-1]
        del free[len(free) - num_pages:]
        for page in taken:
            self._owner[page] = (kind, owner)
        self._used[kind] += num_pages
        return taken

    def free(self, pages: list[int], kind: str, owner) -> None:
        for page in pages:  # check all first: a bad free changes nothing
            if self._owner[page] != (kind, owner):
                raise RuntimeError(f"page {page} is owned by {self._owner[page]}, not {(kind, owner)}")
        for page in pages:
            self._owner[page] = None
        self._used[kind] -= len(pages)
        self._free[kind].extend(reversed(pages))

    def stats(self) -> dict[str, int]:
        return {"pages_total": self.num_pages, "pages_free": self.num_free,
                "pages_kv": self._used[KV], "pages_adapter": self._used[ADAPTER]}
