"""AdapterStore: every registered adapter in host memory, the ones in use copied into pool pages.

- register: validate (peft.py), pack into the pool's row layout (layout.py) once, keep on host;
- acquire: a request that is admitted pins its adapter (refcount), loading it into free pages
  first if it is not resident; release unpins it;
- unpinned adapters stay resident (cached) and leave least-recently-used first, only when pages
  are needed (make_room);
- prefetch: load an adapter that requests will soon need into pages that are free anyway.
Loads are dispatched asynchronously, so a load issued before a step overlaps the step before it.
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict

import numpy as np

from jaxserve.config import LORA_MODULES, ModelConfig
from jaxserve.lora.layout import (AdapterLayout, local_rows, pack_rows, padded_to_rank, plan_layout, pool_rows,
                                  slot_pages, table_layout)
from jaxserve.lora.peft import PeftAdapter
from jaxserve.lora.request import LoRARequest
from jaxserve.memory.device_pool import DevicePool
from jaxserve.memory.pool import ADAPTER, PagePool, PoolFull


@dataclasses.dataclass
class StoredAdapter:
    request: LoRARequest
    layout: AdapterLayout
    rows: np.ndarray                  # host copy, [L, 2, num_pages, page_size, row_width]
    local_rows: np.ndarray            # adapter-relative row of each LoRA table entry
    ranks: np.ndarray                 # [2M] each LoRA module's A rank, then B's (layout.local_rows)
    pages: list[int] | None = None    # where it sits in the pool, None when not resident
    table: np.ndarray | None = None   # pool-row ids of each table entry while resident
    refcount: int = 0


class AdapterStore:
    def __init__(self, cfg: ModelConfig, pool: PagePool, device: DevicePool, max_lora_rank: int, dtype,
                 modules: tuple[str, ...] = LORA_MODULES, padded: bool = False, pack=pack_rows):
        """cfg: the shapes adapters are laid out for (under tensor parallelism one device's view,
        distributed/lora_layout.py, whose pack_split is then `pack`)."""
        self.cfg, self.pool, self.device, self._pack = cfg, pool, device, pack
        self.max_lora_rank, self.dtype, self.modules = max_lora_rank, dtype, modules
        # The padded-slot baseline (EngineConfig.adapter_memory="padded"): every adapter stored and
        # computed at max_lora_rank on every module, as fixed slots hold them.
        self.padded = padded
        self.tables = table_layout(cfg, max_lora_rank, modules)
        self._adapters: dict[str, StoredAdapter] = {}
        # Resident adapters with refcount 0, LRU first, -> their page count; and the pages' total,
        # kept as they come and go (admission asks for it every step; 1,000s of adapters).
        self._unpinned: OrderedDict[str, int] = OrderedDict()
        self._unpinned_pages = 0
        self.loads = self.evictions = self.bytes_loaded = 0
        self.load_seconds = 0.0

    # ---- registry -------------------------------------------------------------------------
    def check(self, request: LoRARequest, adapter: PeftAdapter) -> AdapterLayout:
        """Raise unless the adapter can be registered; its layout if it can. Changes nothing."""
        if request.lora_name in self._adapters:
            raise ValueError(f"LoRA {request.lora_name!r} is already registered")
        if adapter.max_rank > self.max_lora_rank:
            raise ValueError(f"LoRA {request.lora_name!r} has rank {adapter.max_rank}; allowed: at most "
                             f"max_lora_rank={self.max_lora_rank}")
        outside = sorted(set(adapter.target_modules) - set(self.modules))
        if outside:
            raise ValueError(f"LoRA {request.lora_name!r} adapts {', '.join(outside)}; allowed (the engine's "
                             f"lora_modules): {', '.join(self.modules)}")
        layout = plan_layout(self._stored_form(adapter), self.cfg, self.pool.page_size)
        if layout.num_pages > self.pool.capacity(ADAPTER):
            # Never fits, whatever is freed: bad input (ValueError, as a request larger than the
            # pool is), not a PoolFull to wait on.
            room = "the whole pool" if self.pool.unified else "the adapters' region"
            raise ValueError(f"LoRA {request.lora_name!r} needs {layout.num_pages} pages; allowed: at most {room}, "
                             f"{self.pool.capacity(ADAPTER)} pages (a larger pool_bytes / num_pool_pages, or "
                             f"a lower rank)")
        return layout

    def _stored_form(self, adapter: PeftAdapter) -> PeftAdapter:
        return padded_to_rank(adapter, self.max_lora_rank, self.modules, self.cfg) if self.padded else adapter

    def register(self, request: LoRARequest, adapter: PeftAdapter) -> None:
        layout = self.check(request, adapter)
        adapter = self._stored_form(adapter)
        rows = self._pack(adapter, layout, self.cfg, self.pool.page_size, self.dtype)
        local, ranks = local_rows(layout, self.tables)
        self._adapters[request.lora_name] = StoredAdapter(request, layout, rows, local, ranks)

    def unregister(self, name: str) -> None:
        stored = self._get(name)
        if stored.refcount:
            raise RuntimeError(f"LoRA {name!r} is in use by {stored.refcount} running request(s); "
                               f"remove it once they finish (or abort them)")
        if stored.pages is not None:
            self._evict(name, count=False)
        del self._adapters[name]

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def request_of(self, name: str) -> LoRARequest:
        return self._get(name).request

    def _get(self, name: str) -> StoredAdapter:
        if name not in self._adapters:
            raise KeyError(f"LoRA {name!r} is not registered; registered: {self.names()[:20]}")
        return self._adapters[name]

    # ---- residency ------------------------------------------------------------------------
    def is_resident(self, name: str) -> bool:
        return self._get(name).pages is not None

    def max_adapter_pages(self) -> int:
        """Pages of the largest adapter this store accepts: max_lora_rank on every module."""
        return min(self.pool.capacity(ADAPTER), slot_pages(self.cfg, self.max_lora_rank, self.modules,
                                                           self.pool.page_size))

    def pages_of(self, name: str) -> int:
        return self._get(name).layout.num_pages

    def pages_to_load(self, name: str) -> int:
        stored = self._get(name)
        return 0 if stored.pages is not None else stored.layout.num_pages

    def reclaimable_pages(self, keep: str | None = None) -> int:
        """Pages that evicting every unpinned adapter but `keep` would free."""
        return self._unpinned_pages - self._unpinned.get(keep, 0)

    def make_room(self, num_pages: int, keep: str | None = None) -> None:
        """Evict unpinned adapters but `keep` (about to be used), least recently used first, until
        num_pages are free."""
        for name in list(self._unpinned):
            if self.pool.free_for(ADAPTER) >= num_pages:
                break
            if name != keep:
                self._evict(name)
        if self.pool.free_for(ADAPTER) < num_pages:
            raise PoolFull(f"{num_pages} pages needed; {self.pool.free_for(ADAPTER)} free and the rest hold KV "
                           f"caches or adapters in use")

    def acquire(self, name: str) -> None:
        """Pin the adapter for a running request, loading it first if needed (evicting as needed)."""
        stored = self._get(name)
        if stored.pages is None:
            self.make_room(stored.layout.num_pages)
            self._load(name)
        self._leave_eviction_list(name)
        stored.refcount += 1

    def release(self, name: str) -> None:
        stored = self._get(name)
        if stored.refcount <= 0:
            raise RuntimeError(f"LoRA {name!r} released more often than acquired")
        stored.refcount -= 1
        if stored.refcount == 0:
            self._join_eviction_list(name)

    def prefetch(self, name: str) -> bool:
        """Load into pages that are free anyway (never evicts); True if now resident."""
        stored = self._get(name)
        if stored.pages is None and stored.layout.num_pages <= self.pool.free_for(ADAPTER):
            self._load(name)
            self._join_eviction_list(name)
        return stored.pages is not None

    def _join_eviction_list(self, name: str) -> None:
        """Onto the eviction list, as the most recently used."""
        pages = len(self._adapters[name].pages)
        self._unpinned[name] = pages
        self._unpinned_pages += pages

    def _leave_eviction_list(self, name: str) -> None:
        """Off the eviction list (if on it)."""
        self._unpinned_pages -= self._unpinned.pop(name, 0)

    def _load(self, name: str) -> None:
        stored = self._adapters[name]
        start = time.perf_counter()
        pages = self.pool.allocate(stored.layout.num_pages, ADAPTER, name)
        try:
            self.device.write_pages(pages, stored.rows)
        except BaseException:  # a failed copy must leave the adapter cleanly not resident
            self.pool.free(pages, ADAPTER, name)
            raise
        stored.pages = pages
        stored.table = pool_rows(stored.local_rows, pages, self.pool.num_pages, self.pool.page_size)
        self.load_seconds += time.perf_counter() - start
        self.loads += 1
        self.bytes_loaded += stored.rows.nbytes

    def _evict(self, name: str, count: bool = True) -> None:
        stored = self._adapters[name]
        self.pool.free(stored.pages, ADAPTER, name)
        self._leave_eviction_list(name)
        stored.pages = stored.table = None
        self.evictions += count

    # ---- for the forward ------------------------------------------------------------------
    def stacked_tables(self, names: list[str], bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """The LoRA op's tables for the active adapters, padded to `bucket` with rank-0 rows, unsplit:
        pool-row ids [bucket, tables.size] and ranks [bucket, 2M] (layout.split_tables splits them)."""
        flat = np.zeros((bucket, self.tables.size), np.int32)
        ranks = np.zeros((bucket, 2 * len(self.modules)), np.int32)
        if names:
            flat[:len(names)] = [self._adapters[n].table for n in names]
            ranks[:len(names)] = [self._adapters[n].ranks for n in names]
        return flat, ranks

    def host_bytes(self) -> int:
        return sum(s.rows.nbytes for s in self._adapters.values())

    def metrics(self) -> dict:
        return {
            "adapters_registered": len(self._adapters),
            "adapters_resident": sum(s.pages is not None for s in self._adapters.values()),
            "adapters_pinned": sum(s.refcount > 0 for s in self._adapters.values()),
            "adapter_loads": self.loads, "adapter_evictions": self.evictions,
            "adapter_bytes_loaded": self.bytes_loaded, "adapter_load_seconds": self.load_seconds,
            "adapter_host_bytes": self.host_bytes(),
        }
