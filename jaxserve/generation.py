"""GenerationLoop: a simple batch loop for LLM.generate (the continuous-batching engine with
preemption and streaming replaces it). Every step runs ONE ragged batch: the decode tokens of all
running sequences plus prefill chunks, under a token budget; sequences with different adapters
share the batch. A sequence reserves KV pages for prompt + max_tokens when admitted, so nothing is
ever preempted here. KV pages and adapter pages come from the same pool: admitting a request may
load its adapter (evicting unused ones) and prefetches the adapters of the next waiting requests.
"""
from __future__ import annotations

from collections import deque

from jaxserve.lora.store import AdapterStore
from jaxserve.memory.pool import KV, PagePool
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.runner import Chunk, ModelRunner
from jaxserve.sequence import Sequence
from jaxserve.tokenizer import Tokenizer


class GenerationLoop:
    PREFETCH_AHEAD = 4  # waiting requests whose adapters are loaded into free pages early

    def __init__(self, runner: ModelRunner, pool: PagePool, adapters: AdapterStore,
                 tokenizer: Tokenizer | None, max_loras: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.runner, self.pool, self.adapters, self.tokenizer = runner, pool, adapters, tokenizer
        self.max_loras, self.max_num_seqs, self.token_budget = max_loras, max_num_seqs, max_num_batched_tokens
        self.num_steps = 0
        self.num_generated = 0

    def run(self, seqs: list[Sequence]) -> None:
        waiting, running = deque(seqs), []
        try:
            while waiting or running:
                self._admit(waiting, running)
                chunks = self._schedule(running)
                for sampled in self.runner.run(chunks):
                    self._append(sampled.seq, sampled.token, sampled.logprob, sampled.top)
                for c in chunks:
                    c.seq.num_computed_tokens += c.length
                self.num_steps += 1
                for seq in [s for s in running if s.finished]:
                    running.remove(seq)
                    self._release(seq)
        finally:  # an exception mid-run must not leak the pages of the sequences in flight
            for seq in running:
                self._release(seq)

    def _admit(self, waiting: deque, running: list) -> None:
        active = {s.lora_name for s in running if s.lora_name}
        while waiting and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if not self.can_admit(seq, active):
                break
            kv_pages = self.pool.pages_for(seq.num_tokens + seq.max_tokens)
            name = seq.lora_name
            self.adapters.make_room(kv_pages + (self.adapters.pages_to_load(name) if name else 0), keep=name)
            if name:
                self.adapters.acquire(name)
            try:
                seq.page_table = self.pool.allocate(kv_pages, KV, seq.request_id)
            except BaseException:  # undo the pin: a failed admission leaves nothing behind
                if name:
                    self.adapters.release(name)
                raise
            waiting.popleft()
            running.append(seq)
            if name:
                active.add(name)
        if not running:
            raise RuntimeError("no request fits the pool")  # LLM's validation prevents it
        for seq in list(waiting)[:self.PREFETCH_AHEAD]:
            if seq.lora_name:
                self.adapters.prefetch(seq.lora_name)

    def can_admit(self, seq: Sequence, active: set[str]) -> bool:
        """Room for its KV (prompt + max_tokens) and its adapter's pages if not resident, counting
        pages that evicting unused adapters would free; and its adapter within max_loras."""
        name = seq.lora_name
        if name and name not in active and len(active) >= self.max_loras:
            return False
        need = self.pool.pages_for(seq.num_tokens + seq.max_tokens)
        need += self.adapters.pages_to_load(name) if name else 0
        return need <= self.pool.num_free + self.adapters.reclaimable_pages(keep=name)

    def _schedule(self, running: list[Sequence]) -> list[Chunk]:
        """Decode tokens first (one each), then prefill chunks in admission order."""
        chunks, budget = [], self.token_budget
        decoding = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        for seq in decoding[:budget]:
            chunks.append(Chunk(seq, seq.num_computed_tokens, 1, True))
        budget -= len(chunks)
        for seq in running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining <= 1 or budget <= 0:
                continue
            length = min(remaining, budget)
            chunks.append(Chunk(seq, seq.num_computed_tokens, length, length == remaining))
            budget -= length
        return chunks

    def _append(self, seq: Sequence, token: int, logprob: float, top: dict | None) -> None:
        seq.output_token_ids.append(token)
        seq.cumulative_logprob += logprob
        if top is not None:
            seq.output_logprobs.append(top)
        self.num_generated += 1
        params = seq.params
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif not params.ignore_eos and self.tokenizer is not None and token in self.tokenizer.eos_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= seq.max_tokens:
            seq.finish_reason = "length"
        if params.stop and self.tokenizer is not None:
            # Decodes the whole output each token (stop strings may span tokens); the engine's
            # incremental detokenizer replaces this.
            text = self.tokenizer.decode(seq.output_token_ids, params.skip_special_tokens)
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                cut, stop = min(hits)
                seq.text, seq.finish_reason, seq.stop_reason = text[:cut], "stop", stop

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.page_table, KV, seq.request_id)
        seq.page_table = []
        if seq.lora_name:
            self.adapters.release(seq.lora_name)

    def output(self, seq: Sequence) -> RequestOutput:
        text = seq.text  # already cut before the stop string when one ended the request
        if self.tokenizer is not None and not isinstance(seq.stop_reason, str):
            text = self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        completion = CompletionOutput(0, text, list(seq.output_token_ids), seq.cumulative_logprob,
                                      seq.output_logprobs if seq.params.logprobs is not None else None,
                                      seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion],
                             seq.finished, seq.lora_request)
