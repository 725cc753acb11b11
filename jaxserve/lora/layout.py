"""Where an adapter's weights sit inside pool pages.

An adapter is stored as rank-rows: for each module, A as [r, in] and B^T (scaling folded in) as
[r, out]. A rank-row wider than the pool row (row_width = kv_heads * head_dim) is split over
ceil(width / row_width) consecutive pool rows, the tail zero-padded. Rows are numbered across the
adapter's pages: adapter row j lives in page pages[j // (2 * page_size)], half
(j % (2 * page_size)) // page_size, offset j % page_size — and in every layer at the same place,
each layer holding its own weights. Only real ranks take rows: no padding to the largest rank.

A module whose rank is split over P devices (cfg.rank_parts: tensor parallelism's column-parallel
modules, distributed/lora_layout.py) stores on each device its share of A's rank-rows,
ceil(r / P), and all P shares' worth of B^T's rows (its output columns of them; zero-padded to
P x ceil(r / P)).
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
    parts: int = 1   # devices its rank is split over (cfg.rank_parts)

    @property
    def a_rank(self) -> int:
        """A's rank-rows held here: a device's share of the rank."""
        return -(-self.rank // self.parts)

    @property
    def b_rank(self) -> int:
        """B^T's rank-rows held here: every share's, each padded to a_rank."""
        return self.rank if self.parts == 1 else self.parts * self.a_rank


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
    modules: dict[str, ModuleRows]
    num_rows: int
    num_pages: int


def chunks(width: int, row_width: int) -> int:
    return -(-width // row_width)


def _rows(rank: int, module: str, cfg: ModelConfig) -> ModuleRows:
    """The module's ModuleRows as if the adapter began with it: b_offset is then A's row count."""
    parts = cfg.rank_parts(module)
    fan_in = cfg.module_shape(module)[0]
    return ModuleRows(rank, 0, -(-rank // parts) * chunks(fan_in, cfg.kv_size), parts)


def module_rows(rank: int, module: str, cfg: ModelConfig) -> int:
    """Adapter rows a module of this rank takes (A's and B^T's)."""
    spec = _rows(rank, module, cfg)
    return spec.b_offset + spec.b_rank * chunks(cfg.module_shape(module)[1], cfg.kv_size)


def plan_layout(adapter: PeftAdapter, cfg: ModelConfig, page_size: int) -> AdapterLayout:
    modules, row = {}, 0
    for module in LORA_MODULES:
        rank = max((w.a.shape[0] for (_, m), w in adapter.weights.items() if m == module), default=0)
        spec = _rows(rank, module, cfg)
        modules[module] = dataclasses.replace(spec, a_offset=row, b_offset=row + spec.b_offset)
        row += module_rows(rank, module, cfg)
    return AdapterLayout(modules, row, max(1, -(-row // (2 * page_size))))


def slot_pages(cfg: ModelConfig, max_rank: int, modules, page_size: int) -> int:
    """Pages of the largest adapter an engine accepts (max_rank on every module): the size of one
    of vLLM's fixed adapter slots."""
    rows = sum(module_rows(max_rank, m, cfg) for m in modules)
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
    a model (R = max_lora_rank): per module, A ids [R, chunks(in)] then B ids [R, chunks(out)]. A
    module whose rank is split over P devices has A ids [ceil(R / P), chunks(in)] and B ids
    [P x ceil(R / P), chunks(out)]: entry (p, i) is share p's rank-row i, where the gathered
    shrink has it."""
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
        spec = _rows(max_rank, module, cfg)
        a = slice(at, at + spec.a_rank * ca)
        b = slice(a.stop, a.stop + spec.b_rank * cb)
        slices[module], at = (a, (spec.a_rank, ca), b, (spec.b_rank, cb)), b.stop
    return TableLayout(max_rank, slices, at)


def local_rows(layout: AdapterLayout, tables: TableLayout) -> tuple[np.ndarray, np.ndarray]:
    """(adapter-relative row id of every table entry [tables.size], ranks [2M]: each module's
    (of tables.slices) A rank-rows, then the B^T rank-rows its expand reads). Entries past a rank
    point at row 0, which the LoRA op masks. A split module's expand reads all its B entries:
    those past a share's rank point at row 0 too — the adapter's own (finite) weights, met by
    shrink values that are exactly 0."""
    rows = np.zeros(tables.size, np.int64)
    ranks = np.zeros(2 * len(tables.slices), np.int32)
    for i, module in enumerate(tables.slices):
        spec = layout.modules[module]
        if spec.rank == 0:  # not adapted: rank 0, every entry row 0 (masked)
            continue
        a, (ra, ca), b, (rb, cb) = tables.slices[module]
        r = np.arange(ra)[:, None]
        rows[a] = np.where(r < spec.a_rank, spec.a_offset + r * ca + np.arange(ca), 0).ravel()
        if spec.parts == 1:
            r = np.arange(rb)[:, None]
            rows[b] = np.where(r < spec.rank, spec.b_offset + r * cb + np.arange(cb), 0).ravel()
            ranks[i], ranks[len(tables.slices) + i] = spec.rank, spec.rank
        else:  # entry (p, i) -> share p's row i, stored at B row p * a_rank + i
            p, r = np.divmod(np.arange(rb), ra)
            row = spec.b_offset + (p * spec.a_rank + r)[:, None] * cb + np.arange(cb)
            rows[b] = np.where((r < spec.a_rank)[:, None], row, 0).ravel()
            ranks[i], ranks[len(tables.slices) + i] = spec.a_rank, rb
    return rows, ranks


def pool_rows(local: np.ndarray, pages: list[int], num_pool_pages: int, page_size: int) -> np.ndarray:
    """Adapter-relative rows -> flat pool-row ids of one layer once the adapter sits in `pages`:
    r = (half * num_pool_pages + page) * page_size + offset, which addresses
    pool[layer].reshape(-1, row_width)[r] (see pallas/reference.lora_delta)."""
    page = np.asarray(pages, np.int64)[local // (2 * page_size)]
    half = (local % (2 * page_size)) // page_size
    return ((half * num_pool_pages + page) * page_size + local % page_size).astype(np.int32)


def split_tables(flat: np.ndarray, ranks: np.ndarray, tables: TableLayout) -> dict:
    """Stacked [n, size] pool-row ids and [n, 2M] ranks -> the LoRA op's per-module tables
    {module: {"a_rows": [n, Ra, ca], "b_rows": [n, Rb, cb], "rank": [n], "b_rank": [n]}} (views,
    no copies; Ra = Rb = R unless the module's rank is split, b_rank = rank unless it is).
    Works on numpy and on traced arrays: the runner splits inside the jitted step, so a batch
    sends two arrays to the device instead of three per module."""
    n, m = flat.shape[0], len(tables.slices)
    return {module: {"a_rows": flat[:, a].reshape(n, *a_shape), "b_rows": flat[:, b].reshape(n, *b_shape),
                     "rank": ranks[:, i], "b_rank": ranks[:, m + i]}
            for i, (module, (a, a_shape, b, b_shape)) in enumerate(tables.slices.items())}
