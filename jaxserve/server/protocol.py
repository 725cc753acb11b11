"""The OpenAI request bodies the server takes (pydantic), and their SamplingParams.

Fields OpenAI defines that jaxserve cannot honour are refused with a 400 naming them, rather than
silently ignored; fields nobody defines (any client's extras) are accepted and ignored, as vLLM
does. vLLM's extra sampling fields (top_k, ignore_eos, stop_token_ids, skip_special_tokens, ...)
work as they do there.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jaxserve.sampling import MAX_LOGPROBS, SamplingParams
from jaxserve.server.errors import OpenAIError

# Parallel completions per request (n, or the prompts of one completions request, times n).
MAX_CHOICES = 128


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Request):
    """The sampling fields completions and chat share."""
    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    def _refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(f"{name}={getattr(self, name)!r} is not supported; allowed: 0", param=name)
        if self.logit_bias:
            raise OpenAIError("logit_bias is not supported; allowed: null or {}", param="logit_bias")
        if not 1 <= self.n <= MAX_CHOICES:
            raise OpenAIError(f"n={self.n} is invalid; allowed: an integer in [1, {MAX_CHOICES}]", param="n")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams (OpenAI's defaults: temperature 1, top_p 1); a ValueError names a bad
        value (the caller turns it into a 400)."""
        self._refuse_unsupported()
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed, max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | dict]:
        """Each prompt as the engine takes it: text, or {"prompt_token_ids": [...]}."""
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [{"prompt_token_ids": list(p)}]
        else:
            prompts = [x if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in p]
        if not prompts:
            raise OpenAIError("prompt is empty; allowed: a string, a list of strings, a list of token ids or a "
                              "list of such lists", param="prompt")
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise OpenAIError(f"best_of={self.best_of} is not supported; allowed: null or n", param="best_of")
        if self.suffix:
            raise OpenAIError("suffix is not supported; allowed: null", param="suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(f"logprobs={self.logprobs} is invalid; allowed: an integer in [0, {MAX_LOGPROBS}]",
                              param="logprobs")
        return self.sampling_params(self.max_tokens, self.logprobs)


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict:
        """The message as chat templates take it: role and content strings (text parts joined;
        other parts refused), plus any other fields it carries (name, tool_calls, ...)."""
        content = self.content
        if isinstance(content, list):
            kinds = sorted({part.type for part in content if part.type != "text"})
            if kinds:
                raise OpenAIError(f"message content parts of type {', '.join(kinds)} are not supported; allowed: "
                                  f"text", param="messages")
            content = "".join(part.text or "" for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ResponseFormat(_Request):
    type: str = "text"


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise OpenAIError("messages is empty; allowed: a list of at least one message", param="messages")
        if self.response_format is not None and self.response_format.type != "text":
            raise OpenAIError(f"response_format type {self.response_format.type!r} is not supported; allowed: "
                              f"text", param="response_format")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise OpenAIError(f"top_logprobs={self.top_logprobs} is invalid; allowed: an integer in "
                                  f"[0, {MAX_LOGPROBS}]", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, logprobs)


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None

