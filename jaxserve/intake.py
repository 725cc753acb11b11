"""RequestIntake: turns what a caller hands the engine (a prompt, SamplingParams, a LoRARequest,
a client) into a validated `Sequence`, changing nothing: every rejection is a ValueError (or an
AdapterError) that names the value and what is allowed. New adapters are loaded and checked
here; the engine registers them only once the whole request passed."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.detokenizer import IncrementalDetokenizer
from jaxserve.lora.peft import PeftAdapter, load_peft_adapter
from jaxserve.lora.request import LoRARequest
from jaxserve.lora.store import AdapterStore
from jaxserve.memory.pool import KV, PagePool
from jaxserve.outputs import RequestMetrics
from jaxserve.sampling import SamplingParams
from jaxserve.sequence import Sequence
from jaxserve.tokenizer import Tokenizer

# name -> (its request, the loaded adapter, the pool pages it would take)
NewAdapters = dict[str, tuple[LoRARequest, PeftAdapter, int]]


class RequestIntake:
    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer | None, max_model_len: int,
                 pool: PagePool, adapters: AdapterStore, max_lora_rank: int, seed: int):
        self.model_config, self.tokenizer, self.max_model_len = model_config, tokenizer, max_model_len
        self.pool, self.adapters, self.max_lora_rank = pool, adapters, max_lora_rank
        self._seed_rng = np.random.default_rng(seed)  # seeds of requests that give none
        self._order = itertools.count()  # admission tie-break: the order requests came in

    def load_new_adapters(self, requests) -> NewAdapters:
        """Load and validate every adapter not yet registered (with the pages each would take)."""
        loaded: NewAdapters = {}
        for req in requests:
            if req is None:
                continue
            if not isinstance(req, LoRARequest):
                raise ValueError(f"lora_request {req!r} is invalid; allowed: None or a LoRARequest")
            known = (self.adapters.request_of(req.lora_name) if req.lora_name in self.adapters
                     else loaded.get(req.lora_name, (None,))[0])
            if known is not None:
                if known.lora_path != req.lora_path and Path(known.lora_path).resolve() != Path(req.lora_path).resolve():
                    raise ValueError(f"LoRA name {req.lora_name!r} is already registered with path "
                                     f"{known.lora_path!r}, not {req.lora_path!r}")
                continue
            adapter = load_peft_adapter(req.lora_path, self.model_config, self.max_lora_rank)
            loaded[req.lora_name] = (req, adapter, self.adapters.check(req, adapter).num_pages)
        return loaded

    def make_sequence(self, request_id: str, prompt, params: SamplingParams | None,
                      lora_request: LoRARequest | None = None, client: str | None = None,
                      arrival_time: float | None = None, new_adapters: NewAdapters | None = None) -> Sequence:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params {params!r} is invalid; allowed: a SamplingParams")
        params.validate()  # (it may have been changed since it was made)
        text, ids = self._prompt_ids(prompt)
        vocab = self.model_config.vocab_size
        if not ids or not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids={ids[:8]!r}{'...' if len(ids) > 8 else ''} is invalid; allowed: a "
                             f"non-empty list of ids in [0, {vocab})")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt has {len(ids)} tokens; allowed: at most max_model_len - 1 = "
                             f"{self.max_model_len - 1}")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        pages = self.pool.pages_for(len(ids) + max_tokens)
        adapter_pages = 0
        if lora_request is not None:
            new = (new_adapters or {}).get(lora_request.lora_name)
            adapter_pages = new[2] if new else self.adapters.pages_of(lora_request.lora_name)
        if self.pool.unified:
            pages, room = pages + adapter_pages, self.pool.num_pages  # (adapters' own limit: AdapterStore.check)
        else:
            room = self.pool.capacity(KV)
        if pages > room:
            raise ValueError(f"prompt + max_tokens (and its adapter) need {pages} pages; the pool has "
                             f"{room}: this request could never run")
        if client is not None and (not isinstance(client, str) or not client):
            raise ValueError(f"client={client!r} is invalid; allowed: None or a non-empty string")
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**63))
        now = time.monotonic()
        seq = Sequence(str(request_id), text, [int(t) for t in ids], params, seed, max_tokens, lora_request,
                       client=client or (lora_request.lora_name if lora_request else "default"),
                       arrival_time=now if arrival_time is None else arrival_time, order=next(self._order))
        seq.metrics = RequestMetrics(arrival_time=seq.arrival_time, num_prompt_tokens=len(ids))
        if not params.ignore_eos and self.tokenizer is not None:
            seq.stop_ids = seq.stop_ids | set(self.tokenizer.eos_token_ids)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop)
        return seq

    def _prompt_ids(self, prompt) -> tuple[str | None, list]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass {'prompt_token_ids': [...]} prompts")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt {prompt!r:.80} is invalid; allowed: valid Unicode text ({e.reason} at "
                                 f"index {e.start})") from None
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError(f"prompt {prompt!r} is invalid; allowed: text of at least one token (this "
                                 f"tokenizer adds no BOS token to an empty prompt)")
            return prompt, ids
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple, np.ndarray)):
                raise ValueError(f"prompt_token_ids={ids!r:.80} is invalid; allowed: a non-empty list of token ids")
            return prompt.get("prompt"), list(ids)
        raise ValueError(f"prompt {prompt!r:.80} is invalid; allowed: a str or {{'prompt_token_ids': [...]}}")
