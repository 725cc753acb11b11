"""The unified page pool (S-LoRA's Unified Paging), host side: ONE free list of fixed-size pages
handed to two kinds of owner — a sequence's KV cache and an adapter's weights.

The device side is one array [L, 2, num_pages, page_size, row_width] (memory/device_pool.py):
page p is the same page in every layer, so one page id serves a sequence's KV for all layers or a
slice of an adapter for all layers. This class only accounts; it never touches the device.
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
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a pool needs >= 1 page of >= 1 row; got {num_pages} pages of {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, -1, -1))
        self._owner: list[tuple[str, object] | None] = [None] * num_pages
        self._used = {KV: 0, ADAPTER: 0}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def num_used(self, kind: str) -> int:
        return self._used[kind]

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def owner_of(self, page: int) -> tuple[str, object] | None:
        return self._owner[page]

    def allocate(self, num_pages: int, kind: str, owner) -> list[int]:
        if num_pages > len(self._free):
            raise PoolFull(f"asked for {num_pages} pages for {kind} {owner!r}; {len(self._free)} of "
                           f"{self.num_pages} are free")
        taken = self._free[len(self._free) - num_pages:][::-1]
        del self._free[len(self._free) - num_pages:]
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
        self._free.extend(reversed(pages))

    def stats(self) -> dict[str, int]:
        return {"pages_total": self.num_pages, "pages_free": self.num_free,
                "pages_kv": self._used[KV], "pages_adapter": self._used[ADAPTER]}
