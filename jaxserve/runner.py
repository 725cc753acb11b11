"""ModelRunner: turns a list of scheduled chunks into one padded ragged batch, runs the jitted
forward (the unified pool donated, updated in place) and the on-device sampler.

Every shape is drawn from a small fixed set so compilation is bounded and can all happen at
start-up (warmup): tokens per batch are padded to a bucket (16, 32, 48, 64, 96, 128, then powers
of two, capped at max_num_batched_tokens), logits are computed for min(tokens,
max_num_seqs) rows, and the sequence axis is always max_num_seqs. Backends that cut page tables
to the batch's longest sequence (reference, pallas) add page buckets (1, 4, 16, ... pages); the
xla backend walks pages in a loop and needs none. With LoRA, the xla backend's tile count is
picked per step from the batch (the tiles it needs, rounded up to one of three options per token
bucket, the last of which holds any batch); the other backends take the adapter tables as they are. The persistent compilation
cache makes later start-ups fast.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from functools import partial
from itertools import repeat
from operator import attrgetter

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxserve import runtime
from jaxserve.batching import Chunk
from jaxserve.config import ModelConfig
from jaxserve.distributed.tensor_parallel import AXIS, POOL_SPEC, TensorParallel
from jaxserve.lora.layout import split_tables
from jaxserve.lora.store import AdapterStore
from jaxserve.memory.device_pool import DevicePool
from jaxserve.memory.slots import SlotTable
from jaxserve.model import llama
from jaxserve.packed import COLUMN, PackedBatch, SamplerInputs, sampler_table
from jaxserve.pallas import ops
from jaxserve.pallas.plan import StepPlan
from jaxserve.shapes import lora_tile_options, lora_tiles_needed, token_buckets
from jaxserve.sampling import MAX_LOGPROBS, SAMPLER_MODES, sample_packed, sampler_mode
from jaxserve.sequence import Sequence

logger = logging.getLogger("jaxserve")
STEP = COLUMN["step"]  # (the sampler columns before it are a request's fixed sampling_row)

def _step_forward(params, pool, batch: PackedBatch, prev_tokens, lora_flat, lora_ranks, *, cfg: ModelConfig,
                  kernels: str, lora_layout, plan: StepPlan, num_logits: int, tp_axis: str | None = None,
                  tp_lora: str = "s-lora"):
    """llama.forward over a batch packed into few arrays (packed.py: each host-to-device transfer
    costs tens of microseconds, so a step sends two int32 arrays, plus two for LoRA)."""
    lora = split_tables(lora_flat, lora_ranks, lora_layout) if lora_flat is not None else None
    return llama.forward(params, pool, batch.unpack(), prev_tokens, cfg, lora, kernels, plan, num_logits, tp_axis,
                         tp_lora)


def _step_forward_tp(params, pool, batch: PackedBatch, prev_tokens, lora_flat, lora_ranks, *, cfg: ModelConfig,
                     kernels: str, lora_layout, plan: StepPlan, num_logits: int, tp: TensorParallel):
    """_step_forward on each device of tp's mesh, on its shards (cfg: the local config); the
    batch and adapter tables go to every device, the logits come back replicated. check_vma is
    off: the kernels' pallas_calls carry no replication annotations."""
    body = partial(_step_forward, cfg=cfg, kernels=kernels, lora_layout=lora_layout, plan=plan,
                   num_logits=num_logits, tp_axis=AXIS, tp_lora=tp.lora_scheme)
    in_specs = (tp.param_specs(params), POOL_SPEC, P(), P(), P(), P())
    return jax.shard_map(body, mesh=tp.mesh, in_specs=in_specs, out_specs=(P(), POOL_SPEC), check_vma=False)(
        params, pool, batch, prev_tokens, lora_flat, lora_ranks)


# One jitted step for the process: runners of the same model config share compiled variants.
_STATIC = ("cfg", "kernels", "lora_layout", "plan", "num_logits")
_jitted_forward = jax.jit(_step_forward, static_argnames=_STATIC, donate_argnums=(1,))
_jitted_forward_tp = jax.jit(_step_forward_tp, static_argnames=_STATIC + ("tp",), donate_argnums=(1,))


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose sampled tokens the host has not read yet. Its logits rows follow
    `sampling`: the decode sequences first, then the prefill chunks that sample."""
    sampling: list[Sequence]
    rows: dict[Sequence, int]   # a sampling sequence -> its row: its token is on the device until read
    arrays: tuple               # device arrays: tokens, token logprob, top ids, top logprobs
    step_id: int
    wants_logprobs: bool        # some sampling sequence asked for logprobs


def _geometric(low: int, high: int, factor: int) -> list[int]:
    sizes, n = [], low
    while n < high:
        sizes.append(n)
        n *= factor
    return sizes + [high]


def _pick(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, device_pool: DevicePool, adapters: AdapterStore, slots: SlotTable,
                 *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, max_loras: int,
                 kernels: str = ops.DEFAULT, tp: TensorParallel | None = None):
        self.cfg, self.adapters, self.device_pool = cfg, adapters, device_pool
        self.slots = slots  # the running sequences' persistent rows (read only: KVManager writes them)
        self.page_size = device_pool.array.shape[3]
        self.params = params
        self.max_num_seqs, self.max_loras = max_num_seqs, max_loras
        self.token_buckets = token_buckets(max_num_batched_tokens)
        self.backend = ops.get_ops(kernels)
        max_pages = -(-max_model_len // self.page_size)
        self.page_buckets = _geometric(1, max_pages, 4) if self.backend.page_buckets else [max_pages]
        self.kernels = kernels
        # params: split over tp's mesh when given (loading.load_model placed them), each device
        # then running the local config.
        self._forward = (partial(_jitted_forward, cfg=cfg, kernels=kernels, lora_layout=adapters.tables) if tp is None
                         else partial(_jitted_forward_tp, cfg=tp.local_cfg, kernels=kernels,
                                      lora_layout=adapters.tables, tp=tp))
        # Where the step's outputs live: under TP, replicated over the mesh. Warm-up compiles for
        # it (an input placed elsewhere would be another executable, compiled at first use).
        self._replicated = None if tp is None else tp.sharding(P())
        self._last_tokens = jax.device_put(np.zeros(max_num_seqs, np.int32), self._replicated)  # latest samples
        self.mirror = None  # multi-host: the leader's link to its followers (distributed/multihost.py)
        self._dispatched = 0
        self.device_time = 0.0
        self.num_compiled = 0
        self.compile_seconds = 0.0

    # ---- shapes and compilation -----------------------------------------------------------
    def plan(self, num_tokens: int, lora_ids: np.ndarray | None) -> StepPlan:
        """The static choices for a step of num_tokens (a bucket) tokens; lora_ids None: no LoRA."""
        if not self.backend.lora_tiles:  # a spec-signature backend: only "LoRA or not" is static
            return StepPlan(0 if lora_ids is None else 1, 0, 0)
        # Decode tokens and continuing chunks come first: the first attention segment holds them.
        ctx_rows = min(num_tokens, max(self.max_num_seqs, num_tokens // 2))
        ctx_rows = 0 if ctx_rows == num_tokens else ctx_rows
        if lora_ids is None:
            return StepPlan(0, 0, ctx_rows)
        for tiles, size in lora_tile_options(num_tokens, self.max_loras):
            if size == 1 or lora_tiles_needed(lora_ids, size) <= tiles:
                return StepPlan(tiles, size, ctx_rows)
        raise AssertionError("the last tile option holds any batch")

    def num_logits(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    def shape_variants(self) -> list[tuple[int, int, StepPlan]]:
        """Every (tokens, pages, plan) a step can use."""
        variants = []
        for tokens in self.token_buckets:
            plans = [self.plan(tokens, None)]
            if self.backend.lora_tiles:
                plans += [self.plan(tokens, None)._replace(lora_tiles=n, tile_size=size)
                          for n, size in lora_tile_options(tokens, self.max_loras)]
            else:
                plans.append(StepPlan(1, 0, 0))
            variants += [(tokens, pages, plan) for pages in self.page_buckets for plan in plans]
        return variants

    def warmup(self) -> None:
        """Compile every batch shape and sampler variant ahead of time (lower + compile, nothing
        runs: executing the largest shapes on CPU would cost more than compiling them). The
        executables land in the persistent compilation cache, so a request's first use of a
        shape only traces and loads it: no request ever waits for an XLA compile."""
        start = time.perf_counter()
        before = runtime.backend_compiles()
        n = self.max_num_seqs
        for tokens, pages, plan in self.shape_variants():
            tables = self.adapters.stacked_tables([], self.max_loras) if plan.lora_tiles else (None, None)
            self._forward.func.lower(self.params, self.device_pool.array, PackedBatch.empty(tokens, n, pages),
                                  self._last_tokens, *tables,
                                  plan=plan, num_logits=self.num_logits(tokens),
                                  **self._forward.keywords).compile()
        rows = sorted({self.num_logits(t) for t in self.token_buckets})
        for r in rows:
            logits = jax.ShapeDtypeStruct((r, self.cfg.vocab_size), jnp.float32, sharding=self._replicated)
            for num_logprobs in (0, MAX_LOGPROBS):
                for mode in SAMPLER_MODES:
                    sample_packed.lower(logits, SamplerInputs.pack(sampler_table(r)),
                                        num_logprobs=num_logprobs, mode=mode, pad_to=n).compile()
        self.device_pool.warmup(self.adapters.max_adapter_pages())
        after = runtime.backend_compiles()
        self.num_compiled = None if before is None else after - before  # (counted once setup_process ran)
        self.compile_seconds = time.perf_counter() - start
        logger.info("warm-up: %d batch shapes + %d sampler variants + page writes ready (%s executables "
                    "built or loaded from the compilation cache) in %.1f s", len(self.shape_variants()),
                    2 * len(SAMPLER_MODES) * len(rows), self.num_compiled, self.compile_seconds)

    # ---- one step -------------------------------------------------------------------------
    def build_batch(self, decode: list[Sequence], prefill: list[Chunk], pending: Mapping[Sequence, int]
                    ) -> tuple[PackedBatch, np.ndarray, list[str]]:
        """The padded batch (packed.PackedBatch; page-table rows are slots), the sampler's rows
        (packed.SAMPLER_FIELDS) and the batch's active adapters (their order gives lora_ids).
        Decode tokens come first, built with vector operations; then prefill chunks."""
        k = len(decode)
        # The four per-step values of each decode sequence, gathered once; the rest comes from
        # its slot. Everything below is vectorized.
        slots, pos, last = (np.fromiter(map(attrgetter(name), decode), np.int64, k)
                            for name in ("slot", "num_computed_tokens", "last_token"))
        prev = np.fromiter(map(pending.get, decode, repeat(-1, k)), np.int64, k)  # its row of the last samples
        slot_table = self.slots
        block_table = slot_table.block_table
        uids = slot_table.adapter[slots]
        active = [slot_table.adapter_names[u] for u in np.unique(uids[uids >= 0]).tolist()]
        active += dict.fromkeys(c.seq.lora_name for c in prefill if c.seq.lora_name not in active
                                and c.seq.lora_name is not None)
        num_tokens = _pick(self.token_buckets, k + sum(c.length for c in prefill))
        max_pages = _pick(self.page_buckets, max(int(slot_table.num_pages[slots].max(initial=1)),
                                                 max((len(c.seq.page_table) for c in prefill), default=1)))
        ps = self.page_size
        batch = PackedBatch.empty(num_tokens, self.max_num_seqs, max_pages)
        batch.page_tables[:] = block_table[:, :max_pages]
        logits_indices = batch.logits_indices
        t = batch.rows()
        t.token_ids[:k] = np.where(prev >= 0, 0, last)  # a pending token is read from the device
        t.prev_rows[:k] = prev
        t.positions[:k] = t.cached_lens[:k] = pos
        t.token_seq[:k] = slots
        t.slot_mapping[:k] = block_table[slots, pos // ps] * ps + pos % ps
        if active:  # adapter uid -> its index among the batch's active adapters
            lut = np.full(len(slot_table.adapter_names) + 1, -1, np.int64)
            lut[[slot_table.adapter_uids[name] for name in active]] = np.arange(len(active))
            t.lora_ids[:k] = lut[uids]  # (uid -1 reads the last entry: -1)
        logits_indices[:k] = np.arange(k)
        sampler = sampler_table(self.max_num_seqs)
        sampler[:k, :STEP] = slot_table.sampler[slots]
        sampler[:k, STEP] = pos + 1 - slot_table.prompt_len[slots]  # = outputs so far, the pending one included
        offset, num_sampling = k, k
        for c in prefill:
            seq, end = c.seq, offset + c.length
            p = np.arange(c.start, c.start + c.length)
            t.token_ids[offset:end] = (seq.prompt_token_ids + seq.output_token_ids)[c.start:c.start + c.length]
            t.positions[offset:end] = p
            t.token_seq[offset:end] = seq.slot
            t.slot_mapping[offset:end] = block_table[seq.slot, p // ps] * ps + p % ps
            t.cached_lens[offset:end] = c.start
            if seq.lora_name is not None:
                t.lora_ids[offset:end] = active.index(seq.lora_name)
            if c.wants_token:
                logits_indices[num_sampling] = end - 1
                sampler[num_sampling] = seq.sampling_row + (len(seq.output_token_ids),)
                num_sampling += 1
            offset = end
        return batch, sampler, active

    def dispatch(self, decode: list[Sequence], prefill: list[Chunk], pending: Mapping[Sequence, int]) -> InFlight:
        """Build the batch and enqueue forward + sampler on the device; returns at once. A
        decode token whose sequence has a token pending reads it from the previous dispatch."""
        batch, sampler, active = self.build_batch(decode, prefill, pending)
        lora = self.adapters.stacked_tables(active, self.max_loras) if active else (None, None)
        # Everything the sampler needs is ready before the forward is enqueued: once it runs, the
        # device's threads compete with this one for the cores (on CPU), so forward and sampler
        # go out back to back.
        wanted = sampler[:, COLUMN["logprobs"]].max()
        inputs = SamplerInputs.pack(sampler)
        num_logprobs = MAX_LOGPROBS if wanted > 0 else 0  # one compiled variant serves every N
        mode = sampler_mode(sampler[:, COLUMN["temperature"]], sampler[:, COLUMN["top_k"]], sampler[:, COLUMN["top_p"]])
        plan = self.plan(batch.tokens.shape[1], batch.rows().lora_ids if active else None)
        arrays = self.launch(batch, lora, inputs, plan, num_logprobs, mode)
        self._dispatched += 1
        sampling = decode + [c.seq for c in prefill if c.wants_token]
        return InFlight(sampling, {seq: row for row, seq in enumerate(sampling)}, arrays, self._dispatched, wanted >= 0)

    def launch(self, batch: PackedBatch, lora: tuple, inputs, plan: StepPlan, num_logprobs: int, mode) -> tuple:
        """A step's device calls, forward (pool donated) then sampler, enqueued without waiting:
        its sampled tokens etc. as device arrays. Multi-host followers repeat exactly these calls
        (the mirror sends them their inputs first)."""
        if self.mirror is not None:
            self.mirror.send(("step", batch, lora, inputs, plan, num_logprobs, mode))
        rows_out = self.num_logits(batch.tokens.shape[1])
        logits, self.device_pool.array = self._forward(self.params, self.device_pool.array, batch,
                                                       self._last_tokens, *lora, plan=plan, num_logits=rows_out)
        arrays = sample_packed(logits, inputs[:rows_out], num_logprobs=num_logprobs, mode=mode,
                               pad_to=self.max_num_seqs)
        self._last_tokens = arrays[0]
        return arrays

    def collect(self, inflight: InFlight) -> tuple[list[int], list[float], list[dict | None]]:
        """Wait for a dispatched step's tokens (the wait counts as device time): per sampling
        row its token, logprob and top-N dict (None where the request asked for no logprobs)."""
        start = time.perf_counter()
        tokens, logprob, top_ids, top_lp = jax.device_get(inflight.arrays)
        self.device_time += time.perf_counter() - start
        tokens, logprob = tokens.tolist(), logprob.tolist()  # python scalars, once: cheaper per row
        tops: list[dict | None] = [None] * len(inflight.sampling)
        if inflight.wants_logprobs:
            for row, seq in enumerate(inflight.sampling):
                m = seq.params.logprobs
                if m is not None:
                    top = dict(zip(top_ids[row, :m].tolist(), top_lp[row, :m].tolist()))
                    top[tokens[row]] = logprob[row]
                    tops[row] = top
        return tokens, logprob, tops
