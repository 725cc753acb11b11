"""Device-resident adapter slots: a fixed number of adapters on the device at once.

Each slot holds one adapter's A and B rank-rows for every LoRA module and layer, zero-padded to
max_lora_rank (zero rows add nothing, so mixed ranks compute exactly). Loading writes one slot in
place (the slot arrays are donated). Unified Paging replaces these slots with pool pages.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import LORA_MODULES, ModelConfig
from jaxserve.lora.peft import PeftAdapter


@partial(jax.jit, donate_argnums=(0,))
def _write_slot(lora, slot, rows):
    return jax.tree.map(lambda dst, src: dst.at[:, slot].set(src.astype(dst.dtype)), lora, rows)


class LoRASlots:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype):
        self.cfg, self.num_slots, self.max_rank, self.dtype = cfg, num_slots, max_rank, dtype
        self.arrays = None            # allocated on first use: base-only serving pays nothing
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, LRU first
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self.loads = 0

    def _allocate(self):
        shapes = {m: self.cfg.module_shape(m) for m in LORA_MODULES}
        zeros = lambda width: jnp.zeros((self.cfg.num_layers, self.num_slots, self.max_rank, width), self.dtype)
        self.arrays = {m: {"a": zeros(i), "b": zeros(o)} for m, (i, o) in shapes.items()}

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def can_acquire(self, name: str, pinned: set[str]) -> bool:
        return name in self._slot_of or bool(self._free_slots) or any(
            n not in pinned for n in self._slot_of)

    def acquire(self, name: str, adapter: PeftAdapter, pinned: set[str]) -> int:
        """The adapter's slot, loading it (evicting the least recently used unpinned one) if needed."""
        if name in self._slot_of:
            self._slot_of.move_to_end(name)
            return self._slot_of[name]
        if self.arrays is None:
            self._allocate()
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next((n for n in self._slot_of if n not in pinned), None)
            if victim is None:
                raise RuntimeError(f"all {self.num_slots} LoRA slots are pinned by running requests")
            slot = self._slot_of.pop(victim)
        self.arrays = _write_slot(self.arrays, slot, self._host_rows(adapter))
        self._slot_of[name] = slot
        self.loads += 1
        return slot

    def forget(self, name: str) -> None:
        """Drop an adapter's slot (its rows are overwritten by the next load)."""
        if name in self._slot_of:
            self._free_slots.append(self._slot_of.pop(name))

    def _host_rows(self, adapter: PeftAdapter) -> dict:
        rows = {}
        for module in LORA_MODULES:
            fan_in, fan_out = self.cfg.module_shape(module)
            a = np.zeros((self.cfg.num_layers, self.max_rank, fan_in), np.float32)
            b = np.zeros((self.cfg.num_layers, self.max_rank, fan_out), np.float32)
            for layer in range(self.cfg.num_layers):
                w = adapter.weights.get((layer, module))
                if w is not None:
                    rank = w.a.shape[0]
                    a[layer, :rank], b[layer, :rank] = w.a, w.b
            rows[module] = {"a": a, "b": b}
        return rows
