"""GenerationLoop: a simple batch loop for LLM.generate (the continuous-batching engine with
preemption and streaming replaces it). Every step runs ONE ragged batch: the decode tokens of all
running sequences plus prefill chunks, under a token budget; sequences with different adapters
share the batch. A sequence reserves KV pages for prompt + max_tokens when admitted, so nothing is
ever preempted here.
"""
from __future__ import annotations

from collections import deque

from jaxserve.lora.slots import LoRASlots
from jaxserve.memory.pages import PagePool
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.runner import Chunk, ModelRunner
from jaxserve.sequence import Sequence
from jaxserve.tokenizer import Tokenizer


class GenerationLoop:
    def __init__(self, runner: ModelRunner, pool: PagePool, lora_slots: LoRASlots,
                 tokenizer: Tokenizer | None, adapters: dict, max_num_seqs: int, max_num_batched_tokens: int):
        self.runner, self.pool, self.lora_slots, self.tokenizer = runner, pool, lora_slots, tokenizer
        self.adapters, self.max_num_seqs, self.token_budget = adapters, max_num_seqs, max_num_batched_tokens
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
        pinned = {s.lora_name for s in running if s.lora_name}
        while waiting and len(running) < self.max_num_seqs:
            seq = waiting[0]
            need = self.pool.pages_for(seq.num_tokens + seq.max_tokens)
            if need > self.pool.num_free:
                break
            if seq.lora_name and not self.lora_slots.can_acquire(seq.lora_name, pinned):
                break
            waiting.popleft()
            seq.page_table = self.pool.allocate(need)
            if seq.lora_name:
                self.lora_slots.acquire(seq.lora_name, self.adapters[seq.lora_name], pinned)
                pinned.add(seq.lora_name)
            running.append(seq)
        if not running:
            raise RuntimeError("no request fits the KV cache or LoRA slots")  # validation prevents it

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
        self.pool.free(seq.page_table)
        seq.page_table = []

    def output(self, seq: Sequence) -> RequestOutput:
        text = seq.text  # already cut before the stop string when one ended the request
        if self.tokenizer is not None and not isinstance(seq.stop_reason, str):
            text = self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        completion = CompletionOutput(0, text, list(seq.output_token_ids), seq.cumulative_logprob,
                                      seq.output_logprobs if seq.params.logprobs is not None else None,
                                      seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion],
                             seq.finished, seq.lora_request)
