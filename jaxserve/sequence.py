"""Sequence: one request's state while it is generated."""
from __future__ import annotations

import dataclasses

from jaxserve.lora.request import LoRARequest
from jaxserve.sampling import SamplingParams


@dataclasses.dataclass
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                                  # params.seed, or one drawn from the LLM's seed
    max_tokens: int                            # params.max_tokens resolved against max_model_len
    lora_request: LoRARequest | None = None
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    page_table: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0               # tokens whose KV is in the cache
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""

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
