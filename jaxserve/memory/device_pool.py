"""The unified pool on the device: one array [L, 2, num_pages, page_size, row_width] that holds
KV pages and adapter pages alike. Every update donates the array, so it happens in place."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def _write(pool, pages, rows):
    # rows [L, 2, n, page_size, row_width]; page ids past the pool (padding) are dropped.
    return pool.at[:, :, pages].set(rows.astype(pool.dtype), mode="drop")


_write_pages = jax.jit(_write, donate_argnums=(0,))


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DevicePool:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, row_width: int, dtype, sharding=None):
        """sharding: where the array lives under tensor parallelism (rows split by KV head);
        None: the default device."""
        shape = (num_layers, 2, num_pages, page_size, row_width)
        if sharding is None:
            self.array, self._write = jnp.zeros(shape, dtype), _write_pages
        else:  # made in place on each device; page writes keep the split
            self.array = jax.jit(partial(jnp.zeros, shape, dtype), out_shardings=sharding)()
            self._write = jax.jit(_write, donate_argnums=(0,), out_shardings=sharding)
        self.mirror = None  # multi-host: the leader's link to its followers (distributed/multihost.py)

    @property
    def num_pages(self) -> int:
        return self.array.shape[2]

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def warmup(self, max_pages: int) -> None:
        """Compile the page write for every page-count bucket up to max_pages (no data moves)."""
        n = 1
        while True:
            rows = jax.ShapeDtypeStruct((self.array.shape[0], 2, n, *self.array.shape[3:]), self.array.dtype)
            self._write.lower(self.array, np.zeros(n, np.int32), rows).compile()
            if n >= max_pages:
                return
            n *= 2

    def write_pages(self, pages: list[int], rows: np.ndarray) -> None:
        """Copy whole pages in (dispatched asynchronously). rows: [L, 2, len(pages), ps, W].
        The page count is padded to a power of two so few shapes compile."""
        if self.mirror is not None:
            self.mirror.send(("write", pages, rows))
        n = _bucket(len(pages))
        ids = np.full(n, self.num_pages, np.int32)  # out of range: dropped
        ids[:len(pages)] = pages
        if n != len(pages):
            pad = [(0, 0)] * rows.ndim
            pad[2] = (0, n - len(pages))
            rows = np.pad(rows, pad)
        self.array = self._write(self.array, ids, rows)
