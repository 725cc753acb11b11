"""StepPlan: the static choices the runner makes for one step from its batch — part of the
compiled shape, read by a kernel backend's prepare (pallas/ops.py)."""
from __future__ import annotations

from typing import NamedTuple


class StepPlan(NamedTuple):
    lora_tiles: int = 0   # tiles of the grouped LoRA op (xla backend; 0: no LoRA this step)
    tile_size: int = 16   # tokens per LoRA tile
    ctx_rows: int = 0     # rows of the first attention segment (xla backend; 0: one segment)
