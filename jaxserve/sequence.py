"""Sequence: one request's state from add_request to its last output."""
from __future__ import annotations

import dataclasses

from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import RequestMetrics
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
    num_computed_tokens: int = 0               # tokens whose KV is in the cache
    num_charged_prefill: int = 0               # prompt tokens already charged to the scheduler
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: object | None = None          # IncrementalDetokenizer, when there is a tokenizer
    metrics: RequestMetrics = dataclasses.field(default_factory=RequestMetrics)
    # Where the last DELTA output stopped, so the next one carries only what is new.
    sent_tokens: int = 0
    sent_text: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def lora_name(self) -> str | None:
        return self.lora_request.lora_name if self.lora_request else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_decoding(self) -> bool:
        """All but the newest token are in the cache: the next step processes one token."""
        return self.num_tokens - self.num_computed_tokens == 1
