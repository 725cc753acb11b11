"""Sequence: one request's state from add_request to its last output.

Who writes what (one owner each): its tokens and its finish — its own methods (append_token,
finish, preempted); num_computed_tokens and num_charged_prefill — the BatchScheduler (the
cache's progress and what the policy was charged); page_table, slot and capacity — the memory
model (KVManager or the simulator's TokenMemory); sent_tokens / sent_text — output_processor
(delta outputs); stop_ids, detokenizer and metrics' arrival — RequestIntake, once.
"""
from __future__ import annotations

import dataclasses

from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import RequestMetrics
from jaxserve.packed import sampling_row
from jaxserve.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                                  # params.seed, or one drawn from the engine's seed
    max_tokens: int                            # params.max_tokens resolved against max_model_len
    lora_request: LoRARequest | None = None
    client: str = "default"                    # the tenant, for fair scheduling
    arrival_time: float = 0.0
    order: int = 0                             # admission tie-break: the order add_request saw
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    page_table: list[int] = dataclasses.field(default_factory=list)
    slot: int = -1                             # its row of the block table while running, else -1
    capacity: int = 0                          # tokens its pages hold (len(page_table) * page_size)
    num_computed_tokens: int = 0               # tokens whose KV is in the cache
    num_charged_prefill: int = 0               # prompt tokens already charged to the scheduler
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None                   # why, when finish_reason is "error"
    detokenizer: object | None = None          # IncrementalDetokenizer, when there is a tokenizer
    metrics: RequestMetrics = dataclasses.field(default_factory=RequestMetrics)
    # Where the last DELTA output stopped, so the next one carries only what is new.
    sent_tokens: int = 0
    sent_text: int = 0

    def __post_init__(self):
        # Kept as a plain attribute (updated by append_token): the engine reads it per sequence
        # per step, where a property chain is measurably slower.
        # Plain attributes rather than properties for the same reason.
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_tokens = self.num_prompt_tokens + len(self.output_token_ids)
        self.last_token = (self.output_token_ids or self.prompt_token_ids)[-1]
        self.lora_name = self.lora_request.lora_name if self.lora_request else None
        p = self.params  # the sampler's per-request inputs, fixed for the request's life
        self.sampling_row = sampling_row(p.temperature, p.top_p, p.top_k, self.seed, p.logprobs)
        self.output_kind = p.output_kind
        # Tokens that end the request when sampled: its stop_token_ids, plus EOS unless ignore_eos
        # (the engine adds the tokenizer's EOS ids).
        self.stop_ids = frozenset(p.stop_token_ids)

    def append_token(self, token: int, logprob: float = 0.0, top: dict | None = None) -> None:
        """A sampled token (with its logprob, and its top-N logprobs when asked for)."""
        self.output_token_ids.append(token)
        self.num_tokens += 1
        self.last_token = token
        self.cumulative_logprob += logprob
        if top is not None:
            self.output_logprobs.append(top)

    def append_placeholder_tokens(self, count: int) -> None:
        """The simulator's tokens: only their number matters."""
        self.output_token_ids.extend([0] * count)
        self.num_tokens += count
        self.last_token = 0

    def finish(self, reason: str, stop_reason: int | str | None = None, error: str | None = None) -> None:
        """reason: "stop", "length", "abort" or "error" (with error saying why)."""
        self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error

    def preempted(self) -> None:
        """Its cache was dropped: every token is computed again when it is readmitted."""
        self.num_computed_tokens = 0
        self.metrics.num_preemptions += 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
