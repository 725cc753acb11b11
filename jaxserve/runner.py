"""ModelRunner: turns a list of scheduled chunks into one padded ragged batch, runs the jitted
forward (the unified pool donated, updated in place) and the on-device sampler.

Every shape is drawn from a small fixed set so compilation is bounded and can all happen at
start-up (warmup): tokens per batch are padded to a power of four (16, 64, 256, ... capped at
max_num_batched_tokens), pages per sequence likewise (1, 4, 16, ... capped at max_model_len's
pages), the sequence axis is always max_num_seqs, and LoRA tables always hold max_loras adapters
over the configured modules. Powers of four keep the variant count (and start-up) small at the
price of up to 4x padding; the persistent compilation cache makes later start-ups fast.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.lora.store import AdapterStore
from jaxserve.memory.device_pool import DevicePool
from jaxserve.model import llama
from jaxserve.sampling import MAX_LOGPROBS, sample
from jaxserve.sequence import Sequence

logger = logging.getLogger("jaxserve")

# One jitted forward for the process: runners of the same model config share compiled variants.
_jitted_forward = jax.jit(llama.forward, static_argnames=("cfg", "kernels"), donate_argnums=(1,))


@dataclasses.dataclass
class Chunk:
    """Tokens [start, start + length) of seq to process this step; sample after them if wants_token."""
    seq: Sequence
    start: int
    length: int
    wants_token: bool


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose sampled tokens the host has not read yet."""
    chunks: list[Chunk]
    sampling: list[Sequence]
    arrays: tuple               # device arrays: tokens, token logprob, top ids, top logprobs
    step_id: int


@dataclasses.dataclass
class SampledToken:
    seq: Sequence
    token: int
    logprob: float
    top: dict[int, float] | None


def _geometric(low: int, high: int, factor: int) -> list[int]:
    sizes, n = [], low
    while n < high:
        sizes.append(n)
        n *= factor
    return sizes + [high]


def _pick(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, device_pool: DevicePool, adapters: AdapterStore, *,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, max_loras: int,
                 kernels: str = "reference"):
        self.cfg, self.adapters, self.device_pool = cfg, adapters, device_pool
        self.page_size = device_pool.array.shape[3]
        self.params = params
        self.max_num_seqs, self.max_loras = max_num_seqs, max_loras
        self.token_buckets = _geometric(16, max(16, max_num_batched_tokens), 4)
        self.page_buckets = _geometric(1, -(-max_model_len // self.page_size), 4)
        self.kernels = kernels
        self._forward = partial(_jitted_forward, cfg=cfg, kernels=kernels)
        self._last_tokens = jnp.zeros(max_num_seqs, jnp.int32)  # the latest dispatched step's samples
        self._dispatched = 0
        self.device_time = 0.0
        self.num_compiled = 0
        self.compile_seconds = 0.0

    # ---- shapes and compilation -----------------------------------------------------------
    def shape_variants(self) -> list[tuple[int, int, bool]]:
        return [(t, p, lora) for t in self.token_buckets for p in self.page_buckets for lora in (False, True)]

    def warmup(self) -> None:
        """Compile every batch shape and sampler variant ahead of time (lower + compile, nothing
        runs: executing the largest shapes on CPU would cost more than compiling them). The
        executables land in the persistent compilation cache, so a request's first use of a
        shape only traces and loads it: no request ever waits for an XLA compile."""
        start = time.perf_counter()
        before = backend_compiles()
        for tokens, pages, lora in self.shape_variants():
            batch = llama.Batch(*(np.zeros(tokens, np.int32) for _ in range(3)), np.full(tokens, -1, np.int32),
                                np.zeros((self.max_num_seqs, pages), np.int32), np.full(tokens, -1, np.int32),
                                np.zeros(self.max_num_seqs, np.int32), np.full(tokens, -1, np.int32),
                                np.zeros(tokens, np.int32))
            tables = self.adapters.batch_tables([], self.max_loras) if lora else None
            _jitted_forward.lower(self.params, self.device_pool.array, batch, self._last_tokens, cfg=self.cfg,
                                  kernels=self.kernels, lora=tables).compile()
        n = self.max_num_seqs
        logits = jax.ShapeDtypeStruct((n, self.cfg.vocab_size), jnp.float32)
        for num_logprobs in (0, MAX_LOGPROBS):
            for use_filters in (False, True):
                sample.lower(logits, np.zeros(n, np.float32), np.full(n, -1, np.int32), np.ones(n, np.float32),
                             np.zeros((n, 2), np.uint32), np.zeros(n, np.int32), num_logprobs=num_logprobs,
                             use_filters=use_filters).compile()
        self.device_pool.warmup(self.adapters.max_adapter_pages())
        self.num_compiled = backend_compiles() - before
        self.compile_seconds = time.perf_counter() - start
        logger.info("warm-up: %d batch shapes + 4 sampler variants + page writes ready (%d executables "
                    "built or loaded from the compilation cache) in %.1f s", len(self.shape_variants()),
                    self.num_compiled, self.compile_seconds)

    # ---- one step -------------------------------------------------------------------------
    def build_batch(self, chunks: list[Chunk], adapter_index: dict[str, int]) -> llama.Batch:
        """Padded numpy batch; logits rows follow the order of the chunks that sample."""
        lengths = np.array([c.length for c in chunks])
        num_tokens = _pick(self.token_buckets, int(lengths.sum()))
        max_pages = _pick(self.page_buckets, max(len(c.seq.page_table) for c in chunks))
        token_ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        token_seq = np.zeros(num_tokens, np.int32)
        slot_mapping = np.full(num_tokens, -1, np.int32)
        lora_ids = np.full(num_tokens, -1, np.int32)
        prev_rows = np.full(num_tokens, -1, np.int32)
        cached_lens = np.zeros(num_tokens, np.int32)
        page_tables = np.zeros((self.max_num_seqs, max_pages), np.int32)
        logits_indices = np.zeros(self.max_num_seqs, np.int32)
        num_sampling, offset, ps = 0, 0, self.page_size
        for i, c in enumerate(chunks):
            end = offset + c.length
            table = c.seq.page_table
            page_tables[i, :len(table)] = table
            if c.length == 1:  # a decode token (or a 1-token chunk): scalar writes beat slices
                pos, prompt_len = c.start, len(c.seq.prompt_token_ids)
                if c.seq.pending_row >= 0:  # sampled by the step in flight: the device has it
                    prev_rows[offset] = c.seq.pending_row
                else:
                    token_ids[offset] = (c.seq.prompt_token_ids[pos] if pos < prompt_len
                                         else c.seq.output_token_ids[pos - prompt_len])
                positions[offset] = pos
                slot_mapping[offset] = table[pos // ps] * ps + pos % ps
            else:
                pos = np.arange(c.start, c.start + c.length)
                token_ids[offset:end] = c.seq.all_token_ids[c.start:c.start + c.length]
                positions[offset:end] = pos
                slot_mapping[offset:end] = page_tables[i, pos // ps] * ps + pos % ps
            token_seq[offset:end] = i
            cached_lens[offset:end] = c.start
            if c.seq.lora_request is not None:
                lora_ids[offset:end] = adapter_index[c.seq.lora_request.lora_name]
            offset = end
            if c.wants_token:
                logits_indices[num_sampling] = end - 1
                num_sampling += 1
        return llama.Batch(token_ids, positions, token_seq, slot_mapping, page_tables, lora_ids, logits_indices,
                           prev_rows, cached_lens)

    def dispatch(self, chunks: list[Chunk]) -> InFlight:
        """Build the batch and enqueue forward + sampler on the device; returns at once. A
        decode token whose sequence has a token pending reads it from the previous dispatch."""
        active = list(dict.fromkeys(c.seq.lora_name for c in chunks if c.seq.lora_name))
        batch = self.build_batch(chunks, {name: i for i, name in enumerate(active)})
        lora = self.adapters.batch_tables(active, self.max_loras) if active else None
        sampling = [c.seq for c in chunks if c.wants_token]
        logits, self.device_pool.array = self._forward(self.params, self.device_pool.array, batch,
                                                       self._last_tokens, lora=lora)
        n, k = self.max_num_seqs, len(sampling)
        # One row per sampling sequence: temperature, top_p, top_k, seed low/high, step; padded
        # rows are greedy. Built as one array, then split: cheaper than five per-field loops.
        rows = np.zeros((n, 6), np.float64)
        rows[:, 1], rows[:, 2] = 1.0, -1
        if k:
            rows[:k] = np.array([s.sampling_row + (len(s.output_token_ids) + (s.pending_row >= 0),)
                                 for s in sampling], np.float64)
        temperature, top_p = rows[:, 0].astype(np.float32), rows[:, 1].astype(np.float32)
        top_k, steps = rows[:, 2].astype(np.int32), rows[:, 5].astype(np.int32)
        seeds = rows[:, 3:5].astype(np.uint32)
        wanted = max((s.params.logprobs or 0) for s in sampling) if k else 0
        num_logprobs = MAX_LOGPROBS if wanted else 0  # one compiled variant serves every N
        use_filters = bool(((top_k > 0) | (top_p < 1.0)).any())
        arrays = sample(logits, temperature, top_k, top_p, seeds, steps, num_logprobs=num_logprobs,
                        use_filters=use_filters)
        self._last_tokens = arrays[0]
        self._dispatched += 1
        for row, seq in enumerate(sampling):
            seq.pending_row, seq.pending_step = row, self._dispatched
        return InFlight(chunks, sampling, arrays, self._dispatched)

    def collect(self, inflight: InFlight) -> list[SampledToken]:
        """Wait for a dispatched step's tokens (the wait counts as device time) and clear the
        sequences' pending marks (unless a later dispatch already set a new one)."""
        start = time.perf_counter()
        tokens, logprob, top_ids, top_lp = jax.device_get(inflight.arrays)
        self.device_time += time.perf_counter() - start
        tokens, logprob = tokens.tolist(), logprob.tolist()  # python scalars, once: cheaper per row
        results = []
        for row, seq in enumerate(inflight.sampling):
            if seq.pending_step == inflight.step_id:
                seq.pending_row = -1
            top = None
            if seq.params.logprobs is not None:
                m = seq.params.logprobs
                top = dict(zip(top_ids[row, :m].tolist(), top_lp[row, :m].tolist()))
                top[tokens[row]] = logprob[row]
            results.append(SampledToken(seq, tokens[row], logprob[row], top))
        return results


_backend_compiles = 0


def _count_backend_compile(event: str, duration: float, **kwargs) -> None:
    global _backend_compiles
    if event == "/jax/core/compile/backend_compile_duration":
        _backend_compiles += 1


jax.monitoring.register_event_duration_secs_listener(_count_backend_compile)


def backend_compiles() -> int:
    """XLA compilations in this process so far (persistent-cache hits are not compilations)."""
    return _backend_compiles
