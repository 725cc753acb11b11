"""Where an adapter's weights sit inside pool pages.

An adapter is stored as rank-rows: for each module, A as [r, in] and B^T (scaling folded in) as
[r, out]. A rank-row wider than the pool row (row_width = kv_heads * head_dim) is split over
ceil(width / row_width) consecutive pool rows, the tail zero-padded. Rows are numbered across the
adapter's pages: adapter row j lives in page pages[j // (2 * page_size)], half
(j % (2 * page_size)) // page_size, offset j % page_size — and in every layer at the same place,
each layer holding its own weights. Only real ranks take rows: no padding to the largest rank.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.config import LORA_MODULES, ModelConfig
from jaxserve.lora.peft import PeftAdapter


@dataclasses.dataclass(frozen=True)
class ModuleRows:
    rank: int        # largest rank of this module over the layers (0: module not adapted)
    a_offset: int    # first adapter row of A; rank-row i, chunk c is row a_offset + i * a_chunks + c
    b_offset: int


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
    modules: dict[str, ModuleRows]
    num_rows: int
    num_pages: int


def chunks(width: int, row_width: int) -> int:
    return -(-width // row_width)


def plan_layout(adapter: PeftAdapter, cfg: ModelConfig, page_size: int) -> AdapterLayout:
    row_width, modules, row = cfg.kv_size, {}, 0
    for module in LORA_MODULES:
        rank = max((w.a.shape[0] for (_, m), w in adapter.weights.items() if m == module), default=0)
        fan_in, fan_out = cfg.module_shape(module)
        a_offset = row
        row += rank * chunks(fan_in, row_width)
        modules[module] = ModuleRows(rank, a_offset, row)
        row += rank * chunks(fan_out, row_width)
    return AdapterLayout(modules, row, max(1, -(-row // (2 * page_size))))


def pack_rows(adapter: PeftAdapter, layout: AdapterLayout, cfg: ModelConfig, page_size: int,
              dtype) -> np.ndarray:
    """The adapter's pages as the pool holds them: [L, 2, num_pages, page_size, row_width]."""
    row_width = cfg.kv_size
    rows = np.zeros((cfg.num_layers, layout.num_pages * 2 * page_size, row_width), dtype)
    for (layer, module), w in adapter.weights.items():
        spec = layout.modules[module]
        for matrix, offset in ((w.a, spec.a_offset), (w.b, spec.b_offset)):
            rank, width = matrix.shape
            n = chunks(width, row_width)
            padded = np.zeros((rank, n * row_width), np.float32)
            padded[:, :width] = matrix
            rows[layer, offset:offset + rank * n] = padded.reshape(rank * n, row_width)
    # adapter row j -> (page j // 2ps, half, offset): reorder to the pool's [L, 2, pages, ps, W].
    rows = rows.reshape(cfg.num_layers, layout.num_pages, 2, page_size, row_width)
    return np.ascontiguousarray(rows.transpose(0, 2, 1, 3, 4))


def row_tables(layout: AdapterLayout, pages: list[int], num_pool_pages: int, cfg: ModelConfig,
               page_size: int, max_rank: int) -> dict[str, dict[str, np.ndarray]]:
    """For each module, the flat pool-row ids of A and B rank-rows once the adapter sits in
    `pages`: a_rows [max_rank, chunks(in)], b_rows [max_rank, chunks(out)], and its rank.
    A flat row id r addresses pool[layer].reshape(-1, row_width)[r], that is
    r = (half * num_pool_pages + page) * page_size + offset (see pallas/reference.lora_delta)."""
    row_width = cfg.kv_size
    pages = np.asarray(pages, np.int64)

    def flat(adapter_rows: np.ndarray) -> np.ndarray:
        page = pages[adapter_rows // (2 * page_size)]
        half = (adapter_rows % (2 * page_size)) // page_size
        return ((half * num_pool_pages + page) * page_size + adapter_rows % page_size).astype(np.int32)

    tables = {}
    for module in LORA_MODULES:
        spec = layout.modules[module]
        fan_in, fan_out = cfg.module_shape(module)
        ca, cb = chunks(fan_in, row_width), chunks(fan_out, row_width)
        live = np.arange(max_rank)[:, None] < spec.rank
        # Rows past the rank point at the adapter's first row; the kernel masks them by rank.
        a = np.where(live, spec.a_offset + np.arange(max_rank)[:, None] * ca + np.arange(ca), 0)
        b = np.where(live, spec.b_offset + np.arange(max_rank)[:, None] * cb + np.arange(cb), 0)
        tables[module] = {"a_rows": flat(a), "b_rows": flat(b), "rank": np.int32(spec.rank)}
    return tables
