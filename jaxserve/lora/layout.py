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
from jaxserve.lora.peft import LoRAWeights, PeftAdapter


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


def slot_pages(cfg: ModelConfig, max_rank: int, modules, page_size: int) -> int:
    """Pages of the largest adapter an engine accepts (max_rank on every module): the size of one
    of vLLM's fixed adapter slots."""
    rows = sum(max_rank * (chunks(i, cfg.kv_size) + chunks(o, cfg.kv_size))
               for i, o in (cfg.module_shape(m) for m in modules))
    return max(1, -(-rows // (2 * page_size)))


def padded_to_rank(adapter: PeftAdapter, rank: int, modules, cfg: ModelConfig) -> PeftAdapter:
    """The same adapter with every module of `modules` in every layer at `rank`, zero rank-rows
    added (a module it does not adapt is all zeros): the padded-slot baseline's form, whose
    memory and LoRA compute are the largest rank's whatever the adapter's own."""
    weights = {}
    for layer in range(cfg.num_layers):
        for module in modules:
            fan_in, fan_out = cfg.module_shape(module)
            a, b = np.zeros((rank, fan_in), np.float32), np.zeros((rank, fan_out), np.float32)
            own = adapter.weights.get((layer, module))
            if own is not None:
                a[:own.rank], b[:own.rank] = own.a, own.b
            weights[layer, module] = LoRAWeights(a, b, own.scaling if own is not None else 1.0)
    return PeftAdapter(adapter.path, weights, rank, tuple(modules), sum(w.a.nbytes + w.b.nbytes for w in weights.values()))


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


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """How one adapter's pool-row ids are laid out in a flat vector, the same for every adapter of
    a model (R = max_lora_rank): per module, A ids [R, chunks(in)] then B ids [R, chunks(out)]."""
    max_rank: int
    slices: dict[str, tuple[slice, tuple[int, int], slice, tuple[int, int]]]
    size: int

    def __hash__(self):  # a static argument of the jitted step (slices are unhashable before 3.12)
        return hash((self.max_rank, self.size, tuple((m, a.start, a.stop, sa, b.start, b.stop, sb)
                                                       for m, (a, sa, b, sb) in self.slices.items())))


def table_layout(cfg: ModelConfig, max_rank: int, modules=LORA_MODULES) -> TableLayout:
    slices, at = {}, 0
    for module in modules:
        ca, cb = (chunks(w, cfg.kv_size) for w in cfg.module_shape(module))
        a = slice(at, at + max_rank * ca)
        b = slice(a.stop, a.stop + max_rank * cb)
        slices[module], at = (a, (max_rank, ca), b, (max_rank, cb)), b.stop
    return TableLayout(max_rank, slices, at)


def local_rows(layout: AdapterLayout, tables: TableLayout, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(adapter-relative row id of every table entry [tables.size], rank of each module in
    tables.slices [M]). Entries past a module's rank point at row 0; the LoRA op masks them."""
    rows = np.zeros(tables.size, np.int64)
    ranks = np.zeros(len(tables.slices), np.int32)
    r = np.arange(tables.max_rank)[:, None]
    for i, module in enumerate(tables.slices):
        spec = layout.modules[module]
        a, (_, ca), b, (_, cb) = tables.slices[module]
        live = r < spec.rank
        rows[a] = np.where(live, spec.a_offset + r * ca + np.arange(ca), 0).ravel()
        rows[b] = np.where(live, spec.b_offset + r * cb + np.arange(cb), 0).ravel()
        ranks[i] = spec.rank
    return rows, ranks


def pool_rows(local: np.ndarray, pages: list[int], num_pool_pages: int, page_size: int) -> np.ndarray:
    """Adapter-relative rows -> flat pool-row ids of one layer once the adapter sits in `pages`:
    r = (half * num_pool_pages + page) * page_size + offset, which addresses
    pool[layer].reshape(-1, row_width)[r] (see pallas/reference.lora_delta)."""
    page = np.asarray(pages, np.int64)[local // (2 * page_size)]
    half = (local % (2 * page_size)) // page_size
    return ((half * num_pool_pages + page) * page_size + local % page_size).astype(np.int32)


def split_tables(flat: np.ndarray, ranks: np.ndarray, tables: TableLayout) -> dict:
    """Stacked [n, size] pool-row ids and [n, M] ranks -> the LoRA op's per-module tables
    {module: {"a_rows": [n, R, ca], "b_rows": [n, R, cb], "rank": [n]}} (views, no copies).
    Works on numpy and on traced arrays: the runner splits inside the jitted step, so a batch
    sends two arrays to the device instead of three per module."""
    n = flat.shape[0]
    return {module: {"a_rows": flat[:, a].reshape(n, *a_shape), "b_rows": flat[:, b].reshape(n, *b_shape),
                     "rank": ranks[:, i]}
            for i, (module, (a, a_shape, b, b_shape)) in enumerate(tables.slices.items())}
