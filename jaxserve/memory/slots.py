"""SlotTable: the persistent batch — what every running sequence keeps while it runs, one row
per slot, as numpy arrays so the runner builds a batch with a few vector operations instead of
a copy per sequence (as tpu-inference's InputBatch / vLLM's persistent batch).

The memory manager (KVManager) is its only writer: a slot is claimed at admission, its page row
grown with the page table, freed at release. The runner only reads it.

Per slot: its row of `block_table` (the sequence's page table) and `num_pages`; `sampler` (the
request's fixed sampler inputs: temperature, top_p, top_k, seed low/high, logprobs);
`prompt_len`; `adapter` (a small uid, -1 none) with `adapter_names[uid]`. Adapter uids of
finished sequences linger until the table fills, then are compacted to the names some slot
holds: the table stays bounded however many adapters are served over time.
"""
from __future__ import annotations

import numpy as np

from jaxserve.sequence import Sequence


class SlotTable:
    def __init__(self, max_num_seqs: int, max_pages_per_seq: int):
        self.block_table = np.zeros((max_num_seqs, max_pages_per_seq), np.int32)
        self.num_pages = np.zeros(max_num_seqs, np.int32)
        self.sampler = np.zeros((max_num_seqs, 6), np.float64)
        self.prompt_len = np.zeros(max_num_seqs, np.int64)
        self.adapter = np.full(max_num_seqs, -1, np.int64)
        self.adapter_names: list[str] = []
        self.adapter_uids: dict[str, int] = {}
        self._max_adapter_uids = 2 * max_num_seqs + 1
        self._free = list(range(max_num_seqs - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.block_table)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def claim(self, seq: Sequence) -> int:
        """A free slot for an admitted sequence, filled with what it keeps while it runs."""
        if not self._free:  # (the engine admits at most max_num_seqs; a custom policy might not)
            raise RuntimeError(f"no free slot for {seq.request_id!r}: {len(self)} sequences already run")
        slot = self._free.pop()
        self.sampler[slot] = seq.sampling_row
        self.prompt_len[slot] = seq.num_prompt_tokens
        self.adapter[slot] = -1 if seq.lora_name is None else self._adapter_uid(seq.lora_name)
        self.num_pages[slot] = 0
        return slot

    def set_pages(self, slot: int, page_table: list[int], start: int = 0) -> None:
        """page_table[start:] are new pages of the slot's sequence."""
        self.block_table[slot, start:len(page_table)] = page_table[start:]
        self.num_pages[slot] = len(page_table)

    def free(self, slot: int) -> None:
        self.num_pages[slot] = 0
        self.adapter[slot] = -1
        self._free.append(slot)

    def _adapter_uid(self, name: str) -> int:
        uid = self.adapter_uids.get(name)
        if uid is None:
            if len(self.adapter_names) >= self._max_adapter_uids:
                self._compact_adapter_uids()
            uid = self.adapter_uids[name] = len(self.adapter_names)
            self.adapter_names.append(name)
        return uid

    def _compact_adapter_uids(self) -> None:
        """Keep only the names some slot holds (at most max_num_seqs), renumbered."""
        kept = np.unique(self.adapter[self.adapter >= 0])
        renumber = np.full(len(self.adapter_names) + 1, -1, np.int64)  # (-1 reads the last entry: -1)
        renumber[kept] = np.arange(len(kept))
        self.adapter = renumber[self.adapter]
        self.adapter_names = [self.adapter_names[u] for u in kept.tolist()]
        self.adapter_uids = {name: uid for uid, name in enumerate(self.adapter_names)}
