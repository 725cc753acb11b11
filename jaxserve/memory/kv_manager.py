"""KVManager: a running sequence's claim on the unified pool — its KV pages and its adapter.

Admission takes pages for every token the sequence has (its prompt, plus what it generated
before a preemption) and pins its adapter (loading it, evicting unused adapters if needed).
Decoding then grows the page table one page at a time; when the pool cannot supply a page the
engine preempts. Admission keeps a small watermark of pages free so that the sequences already
running can grow a while before anyone must be preempted.

It is the engine's memory model for the BatchScheduler (jaxserve/batching.py): can_admit, admit,
grow, release. Each running sequence also holds a slot of the SlotTable (memory/slots.py), the
persistent batch the runner reads: its page-table row, sampler inputs, prompt length, adapter.
"""
from __future__ import annotations


from jaxserve.lora.store import AdapterStore
from jaxserve.memory.pool import ADAPTER, KV, PagePool
from jaxserve.memory.slots import SlotTable
from jaxserve.sequence import Sequence


class KVManager:
    def __init__(self, pool: PagePool, adapters: AdapterStore, watermark_pages: int, max_num_seqs: int,
                 max_pages_per_seq: int, max_loras: int):
        self.pool, self.adapters, self.watermark, self.max_loras = pool, adapters, watermark_pages, max_loras
        self.slots = SlotTable(max_num_seqs, max_pages_per_seq)  # written here only; the runner reads it
        self.running_loras: dict[str, int] = {}  # adapter -> running sequences using it

    def _fits(self, kv_pages: int, adapter_pages: int, keep: str | None, reserve: int = 0) -> bool:
        """Whether the pages could be had now, evicting unused adapters but `keep` if need be."""
        reclaimable = self.adapters.reclaimable_pages(keep=keep)
        if self.pool.unified:
            return kv_pages + adapter_pages + reserve <= self.pool.num_free + reclaimable
        # Separate regions: evicting adapters frees no KV page.
        return (kv_pages + reserve <= self.pool.free_for(KV)
                and adapter_pages <= self.pool.free_for(ADAPTER) + reclaimable)

    def _make_room(self, kv_pages: int, adapter_pages: int, keep: str | None = None) -> None:
        """Evict unused adapters until the pages are free (KV pages count where they share pages)."""
        self.adapters.make_room(adapter_pages + (kv_pages if self.pool.unified else 0), keep=keep)

    def admission_pages(self, seq: Sequence) -> tuple[int, int]:
        """(KV pages, adapter pages to load) the sequence needs to be admitted now."""
        name = seq.lora_name
        return self.pool.pages_for(seq.num_tokens), (self.adapters.pages_to_load(name) if name else 0)

    def can_admit(self, seq: Sequence, running: int) -> bool:
        name = seq.lora_name
        if name and name not in self.running_loras and len(self.running_loras) >= self.max_loras:
            return False  # max_loras adapters already serve running sequences
        reserve = self.watermark if running else 0  # alone, a request may use every page
        return self._fits(*self.admission_pages(seq), keep=name, reserve=reserve)

    def admit(self, seq: Sequence) -> None:
        if not self.slots.num_free:  # (the engine admits at most max_num_seqs; a custom policy might not)
            raise RuntimeError(f"no free slot for {seq.request_id!r}: {len(self.slots)} sequences already run")
        name = seq.lora_name
        self._make_room(*self.admission_pages(seq), keep=name)
        if name:
            self.adapters.acquire(name)
        try:
            seq.page_table = self.pool.allocate(self.pool.pages_for(seq.num_tokens), KV, seq.request_id)
        except BaseException:  # undo the pin: a failed admission leaves nothing behind
            if name:
                self.adapters.release(name)
            raise
        seq.slot = self.slots.claim(seq)
        self.slots.set_pages(seq.slot, seq.page_table)
        seq.capacity = len(seq.page_table) * self.pool.page_size
        if name:
            self.running_loras[name] = self.running_loras.get(name, 0) + 1

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the page table cover num_tokens; False (nothing changed) if the pool cannot."""
        need = self.pool.pages_for(num_tokens) - len(seq.page_table)
        if need <= 0:
            return True
        if not self._fits(need, 0, keep=None):
            return False
        self._make_room(need, 0)
        have = len(seq.page_table)
        seq.page_table.extend(self.pool.allocate(need, KV, seq.request_id))
        self.slots.set_pages(seq.slot, seq.page_table, have)
        seq.capacity = len(seq.page_table) * self.pool.page_size
        return True

    def release(self, seq: Sequence) -> None:
        self.pool.free(seq.page_table, KV, seq.request_id)
        seq.page_table = []
        seq.capacity = 0
        self.slots.free(seq.slot)
        seq.slot = -1
        name = seq.lora_name
        if name:
            self.adapters.release(name)
            if self.running_loras[name] == 1:
                del self.running_loras[name]
            else:
                self.running_loras[name] -= 1
