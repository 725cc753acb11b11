"""ModelRunner: turns a list of scheduled chunks into one padded ragged batch, runs the jitted
forward (the unified pool donated, updated in place) and the on-device sampler.

Shapes are padded to powers of two (tokens, sequences, pages per sequence) so the number of
compiled variants stays small.
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class Chunk:
    """Tokens [start, start + length) of seq to process this step; sample after them if wants_token."""
    seq: Sequence
    start: int
    length: int
    wants_token: bool


@dataclasses.dataclass
class SampledToken:
    seq: Sequence
    token: int
    logprob: float
    top: dict[int, float] | None


# One jitted forward for the process: LLMs of the same model config share compiled variants.
_jitted_forward = jax.jit(llama.forward, static_argnames=("cfg", "kernels"), donate_argnums=(1,))


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, device_pool: DevicePool, page_size: int, dtype,
                 adapters: AdapterStore, kernels: str = "reference"):
        self.cfg, self.page_size, self.adapters = cfg, page_size, adapters
        self.params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        self.device_pool = device_pool
        self._forward = partial(_jitted_forward, cfg=cfg, kernels=kernels)
        self.device_time = 0.0

    def build_batch(self, chunks: list[Chunk], adapter_index: dict[str, int]) -> llama.Batch:
        """Padded numpy batch; logits rows follow the order of the chunks that sample."""
        lengths = np.array([c.length for c in chunks])
        num_tokens = _bucket(int(lengths.sum()), 8)
        num_seqs = _bucket(len(chunks), 1)
        max_pages = _bucket(max(len(c.seq.page_table) for c in chunks), 1)
        token_ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        token_seq = np.zeros(num_tokens, np.int32)
        slot_mapping = np.full(num_tokens, -1, np.int32)
        lora_ids = np.full(num_tokens, -1, np.int32)
        page_tables = np.zeros((num_seqs, max_pages), np.int32)
        logits_indices = np.zeros(num_seqs, np.int32)
        num_sampling, offset = 0, 0
        for i, c in enumerate(chunks):
            span = slice(offset, offset + c.length)
            pos = np.arange(c.start, c.start + c.length)
            table = np.asarray(c.seq.page_table, np.int32)
            token_ids[span] = c.seq.all_token_ids[c.start:c.start + c.length]
            positions[span] = pos
            token_seq[span] = i
            slot_mapping[span] = table[pos // self.page_size] * self.page_size + pos % self.page_size
            lora_ids[span] = adapter_index.get(c.seq.lora_name, -1)
            page_tables[i, :len(table)] = table
            offset += c.length
            if c.wants_token:
                logits_indices[num_sampling] = offset - 1
                num_sampling += 1
        return llama.Batch(token_ids, positions, token_seq, slot_mapping, page_tables, lora_ids,
                           logits_indices)

    def run(self, chunks: list[Chunk]) -> list[SampledToken]:
        active = list(dict.fromkeys(c.seq.lora_name for c in chunks if c.seq.lora_name))
        batch = self.build_batch(chunks, {name: i for i, name in enumerate(active)})
        lora = self.adapters.batch_tables(active, _bucket(len(active), 1)) if active else None
        sampling = [c.seq for c in chunks if c.wants_token]
        start = time.perf_counter()
        logits, self.device_pool.array = self._forward(self.params, self.device_pool.array, batch, lora=lora)
        if not sampling:
            jax.block_until_ready(self.device_pool.array)
            self.device_time += time.perf_counter() - start
            return []
        n = logits.shape[0]
        pad = n - len(sampling)
        temperature = np.array([s.params.temperature for s in sampling] + [0.0] * pad, np.float32)
        top_k = np.array([s.params.top_k for s in sampling] + [-1] * pad, np.int32)
        top_p = np.array([s.params.top_p for s in sampling] + [1.0] * pad, np.float32)
        seeds = np.array([[s.seed & 0xFFFFFFFF, s.seed >> 32] for s in sampling] + [[0, 0]] * pad, np.uint32)
        steps = np.array([len(s.output_token_ids) for s in sampling] + [0] * pad, np.int32)
        wanted = max((s.params.logprobs or 0) for s in sampling)
        num_logprobs = MAX_LOGPROBS if wanted else 0  # one compiled variant serves every N
        use_filters = bool(((top_k > 0) | (top_p < 1.0)).any())
        tokens, logprob, top_ids, top_lp = jax.device_get(sample(
            logits, temperature, top_k, top_p, seeds, steps, num_logprobs=num_logprobs, use_filters=use_filters))
        self.device_time += time.perf_counter() - start
        results = []
        for row, seq in enumerate(sampling):
            top = None
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                top = {int(t): float(lp) for t, lp in zip(top_ids[row, :k], top_lp[row, :k])}
                top[int(tokens[row])] = float(logprob[row])
            results.append(SampledToken(seq, int(tokens[row]), float(logprob[row]), top))
        return results
