"""Engine: the continuous-batching host loop every request goes through.

Each step():
  1. running sequences that decode claim the page their next token needs; when the pool has
     none, the most recently admitted running sequence is preempted (recompute: its pages are
     freed, it goes back to the scheduler and later re-prefills prompt + generated tokens);
  2. the scheduler offers waiting requests in its policy's order; each is admitted if the
     sequence limit, the token budget and the pool (KV pages for its tokens + its adapter's
     pages, evicting unused adapters) allow;
  3. ONE ragged batch: a decode token for every decoding sequence, then prefill chunks (a long
     prompt is split across steps) up to max_num_batched_tokens; the jitted forward runs with the
     pool donated, the sampler on device;
  4. the host appends tokens, detokenizes incrementally, applies stop conditions, frees finished
     requests' pages, and charges the scheduler with the tokens actually processed.
step() returns a RequestOutput for every request with something to report, shaped by its
SamplingParams.output_kind: "cumulative" (all so far, the default), "delta" (what is new) or
"final_only".
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.batching import BatchScheduler
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.detokenizer import IncrementalDetokenizer
from jaxserve.lora.peft import PeftAdapter, load_peft_adapter
from jaxserve.lora.request import LoRARequest
from jaxserve.lora.store import AdapterStore
from jaxserve.memory.device_pool import DevicePool
from jaxserve.memory.kv_manager import KVManager
from jaxserve.memory.pool import PagePool, page_bytes
from jaxserve.model import weights
from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.pallas.ops import check_backend
from jaxserve.runner import ModelRunner
from jaxserve.sampling import SamplingParams
from jaxserve.sched import Scheduler, make_scheduler
from jaxserve.sequence import Sequence
from jaxserve.tokenizer import Tokenizer

logger = logging.getLogger("jaxserve")
CPU_POOL_BYTES_CAP = 1 << 30
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_INF = float("inf")
# A request whose next-token distribution is not finite cannot go on: finish it, say why.
NON_FINITE_ERROR = ("the model's logits for this request are not finite (NaN or infinity): the forward "
                    "overflowed, e.g. through an adapter whose weights are far too large")


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk (JAXSERVE_COMPILATION_CACHE, default
    ~/.cache/jaxserve/xla/jax-<version>; "off" disables), so every start-up after the first is
    fast. One folder per jax version: two versions sharing a folder have crashed a cache read."""
    path = os.environ.get("JAXSERVE_COMPILATION_CACHE", str(weights.cache_dir() / "xla" / f"jax-{jax.__version__}"))
    if path == "off" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def resolve_dtype(dtype: str):
    if dtype == "auto":  # float32 where there is no accelerator, bfloat16 where there is
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclasses.dataclass
class StepStats:
    """Cumulative step timings: device = forward + sampler until tokens are on the host; host =
    everything else (scheduling, batch building, output processing)."""
    steps: int = 0
    host_seconds: float = 0.0
    device_seconds: float = 0.0
    tokens: int = 0

    @property
    def host_fraction(self) -> float:
        total = self.host_seconds + self.device_seconds
        return self.host_seconds / total if total else 0.0


class Engine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig(**kwargs)
        self.config = config
        start = time.perf_counter()
        enable_compilation_cache()
        self.dtype = resolve_dtype(config.dtype)
        check_backend(config.kernels)  # fail now, not at the first step
        self.model_config, params, self.tokenizer, max_model_len = self._load_model(config)
        cfg = self.model_config
        self.max_model_len = max_model_len
        params = jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params)  # on device before sizing the pool
        num_pages = self._pool_pages(config)
        self.pool = PagePool(num_pages, config.page_size)
        self.device_pool = DevicePool(cfg.num_layers, num_pages, config.page_size, cfg.kv_size, self.dtype)
        logger.info("unified pool: %d pages of %d tokens = %.1f MiB (%d tokens of KV if no adapter)",
                    num_pages, config.page_size, self.device_pool.nbytes / 2**20, num_pages * config.page_size)
        self.adapters = AdapterStore(cfg, self.pool, self.device_pool, config.max_lora_rank, self.dtype,
                                     config.lora_modules)
        self.kv = KVManager(self.pool, self.adapters, watermark_pages=max(1, num_pages // 100),
                            max_num_seqs=config.max_num_seqs, max_pages_per_seq=self.pool.pages_for(max_model_len), max_loras=config.max_loras)
        self.runner = ModelRunner(cfg, params, self.device_pool, self.adapters, max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=max_model_len, max_loras=config.max_loras, kernels=config.kernels)
        self.scheduler = (config.scheduler if isinstance(config.scheduler, Scheduler)
                          else make_scheduler(config.scheduler, **(config.scheduler_options or {})))
        self.batcher = BatchScheduler(self.scheduler, self.kv, max_num_seqs=config.max_num_seqs,
                                      max_num_batched_tokens=config.max_num_batched_tokens,
                                      on_admit=self.runner.bind)
        self._requests: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        # Outputs a step() caller took but does not own (LLM.generate, stream, the async stepper
        # each want only their own requests): handed back, the next step() returns them first.
        self._undelivered: list[RequestOutput] = []
        self._inflight = None  # a dispatched step whose tokens are not processed yet
        # astream consumers by request id: each queue with the event loop it belongs to, so a
        # step run for any loop's stepper reaches it
        self._async_queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._async_ids: set[str] = set()  # requests added by astream, until their last output
        self._stepper: asyncio.Task | None = None
        self._seed_rng = np.random.default_rng(config.seed)
        self._order = itertools.count()
        self._lock = threading.RLock()  # step() and add/abort from other threads (async serving)
        self.stats = StepStats()
        if config.warmup:
            self.runner.warmup()
        # Start-up leaves a large heap (JAX's caches, the model); without this every garbage
        # collection during serving scans it all — measured at ~1.6 ms of a 6 ms step at 256
        # sequences. Frozen objects are never scanned (vLLM and SGLang do the same).
        gc.collect()
        gc.freeze()
        self.load_time = time.perf_counter() - start

    # ---- start-up -------------------------------------------------------------------------
    @staticmethod
    def _load_model(config: EngineConfig):
        path = weights.resolve_model(config.model)
        max_model_len = config.max_model_len
        if path.suffix == ".gguf":
            hf_config, params, gguf = weights.load_gguf_params(path)
            cfg = ModelConfig.from_hf(hf_config)
            tokenizer = Tokenizer(gguf.tokenizer, gguf.chat_template, gguf.bos_token, gguf.eos_token,
                                  cfg.eos_token_ids)
        else:
            hf_config, tensors = weights.read_hf_folder(path)
            cfg = ModelConfig.from_hf(hf_config)
            params = weights.hf_to_params(cfg, tensors)
            tokenizer = (Tokenizer.from_hf_folder(path, cfg.eos_token_ids)
                         if (path / "tokenizer.json").exists() else None)
            window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
            if window and (max_model_len is None or max_model_len > window):
                max_model_len = window  # full attention equals sliding-window attention up to the window
        limit = cfg.max_position_embeddings
        if max_model_len is None:
            max_model_len = min(limit, 2048)
        if not isinstance(max_model_len, int) or not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len!r} is invalid; allowed: 1..{limit}")
        return cfg, params, tokenizer, max_model_len

    def _pool_pages(self, config: EngineConfig) -> int:
        cfg = self.model_config
        per_page = page_bytes(cfg.num_layers, config.page_size, cfg.kv_size, self.dtype)
        if config.num_pool_pages is not None:
            if not isinstance(config.num_pool_pages, int) or config.num_pool_pages < 1:
                raise ValueError(f"num_pool_pages={config.num_pool_pages!r} is invalid; allowed: an integer >= 1")
            return config.num_pool_pages
        pool_bytes = config.pool_bytes
        if pool_bytes is None:
            stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
            if stats and "bytes_limit" in stats:
                if not 0 < config.gpu_memory_utilization <= 1:
                    raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization!r} is invalid; "
                                     f"allowed: (0, 1]")
                pool_bytes = int(stats["bytes_limit"] * config.gpu_memory_utilization) - stats.get("bytes_in_use", 0)
            else:
                pages_per_seq = -(-self.max_model_len // config.page_size)
                pool_bytes = min(CPU_POOL_BYTES_CAP, 2 * config.max_num_seqs * pages_per_seq * per_page)
        if not isinstance(pool_bytes, int) or pool_bytes < per_page:
            raise ValueError(f"pool_bytes={pool_bytes!r} is invalid; allowed: an integer >= one page "
                             f"({per_page} bytes)")
        return pool_bytes // per_page

    # ---- adapters -------------------------------------------------------------------------
    def load_new_loras(self, requests) -> dict[str, tuple[LoRARequest, PeftAdapter, int]]:
        """Load and validate every adapter not yet registered (with the pages each would take);
        registers nothing."""
        loaded: dict[str, tuple[LoRARequest, PeftAdapter, int]] = {}
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
            adapter = load_peft_adapter(req.lora_path, self.model_config, self.config.max_lora_rank)
            loaded[req.lora_name] = (req, adapter, self.adapters.check(req, adapter).num_pages)
        return loaded

    def commit_loras(self, loaded: dict[str, tuple[LoRARequest, PeftAdapter, int]]) -> None:
        with self._lock:
            for req, adapter, _ in loaded.values():
                self.adapters.register(req, adapter)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Register an adapter: validated, packed and kept in host memory; it takes pool pages
        only while requests need it (or until evicted)."""
        self.commit_loras(self.load_new_loras([lora_request]))

    def remove_lora(self, lora_name: str) -> None:
        """Unregister an adapter and free its pages; RuntimeError while unfinished requests
        (running, waiting or preempted) use it."""
        with self._lock:
            users = [s.request_id for s in self._requests.values() if s.lora_name == lora_name and not s.finished]
            if users:
                raise RuntimeError(f"LoRA {lora_name!r} is in use by {len(users)} unfinished request(s) "
                                   f"({', '.join(users[:5])}); remove it once they finish (or abort them)")
            self.adapters.unregister(lora_name)

    def list_loras(self) -> list[str]:
        return self.adapters.names()

    # ---- requests -------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt, params: SamplingParams | None,
                      lora_request: LoRARequest | None = None, client: str | None = None,
                      arrival_time: float | None = None, adapter_pages: dict[str, int] | None = None) -> Sequence:
        """Validate one request into a Sequence (changes nothing)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params {params!r} is invalid; allowed: a SamplingParams")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass {'prompt_token_ids': [...]} prompts")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt {prompt!r:.80} is invalid; allowed: valid Unicode text ({e.reason} at "
                                 f"index {e.start})") from None
            text, ids = prompt, self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError(f"prompt {prompt!r} is invalid; allowed: text of at least one token (this "
                                 f"tokenizer adds no BOS token to an empty prompt)")
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple, np.ndarray)):
                raise ValueError(f"prompt_token_ids={ids!r:.80} is invalid; allowed: a non-empty list of token ids")
            ids = list(ids)
        else:
            raise ValueError(f"prompt {prompt!r:.80} is invalid; allowed: a str or {{'prompt_token_ids': [...]}}")
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
        if lora_request is not None:
            pages += (adapter_pages or {}).get(lora_request.lora_name) or self.adapters.pages_of(lora_request.lora_name)
        if pages > self.pool.num_pages:
            raise ValueError(f"prompt + max_tokens (and its adapter) need {pages} pages; the pool has "
                             f"{self.pool.num_pages}: this request could never run")
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

    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None, client: str | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. A bad one raises ValueError (or AdapterError) and changes nothing."""
        with self._lock:
            if str(request_id) in self._requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            new = self.load_new_loras([lora_request])
            pages = {name: n for name, (_, _, n) in new.items()}
            seq = self.make_sequence(request_id, prompt, sampling_params, lora_request, client, arrival_time, pages)
            self.commit_loras(new)
            self.enqueue(seq)

    def enqueue(self, seq: Sequence) -> None:
        with self._lock:
            if seq.request_id in self._requests:
                raise ValueError(f"request_id {seq.request_id!r} is already in use")
            self._requests[seq.request_id] = seq
            self._aborted += self.batcher.add(seq)  # (rpm with reject=True refuses some)

    def abort(self, request_id: str) -> bool:
        """Stop a request: its pages are freed now; the next step() reports it finished with
        finish_reason "abort". False if it is unknown or already finished."""
        with self._lock:
            seq = self._requests.get(str(request_id))
            if seq is None or seq.finished:
                return False
            self.batcher.finish(seq)
            seq.finish_reason = "abort"
            if seq.detokenizer is not None:
                seq.detokenizer.flush(seq.output_token_ids)
            seq.metrics.finished_time = time.monotonic()
            self._aborted.append(seq)
            return True

    @property
    def running(self) -> list[Sequence]:
        return self.batcher.running

    @property
    def num_preemptions(self) -> int:
        return self.batcher.num_preemptions

    def has_unfinished_requests(self) -> bool:
        return bool(self.batcher.has_unfinished() or self._aborted or self._inflight is not None
                    or self._undelivered)

    def waiting_clients(self) -> set[str]:
        """Clients with requests waiting for admission (new or preempted)."""
        return {s.client for s in self._requests.values() if s.slot < 0 and not s.finished}

    def num_unfinished_requests(self) -> int:
        return len(self.running) + self.batcher.num_waiting

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and dispatch one batch; process the results of the previous batch (with
        async_overlap, while this one runs on the device) or of this one (without)."""
        with self._lock:
            outputs, pause = self._step_locked()
        if pause:  # outside the lock: add_request / abort from other threads go on meanwhile
            time.sleep(pause)
        return outputs

    def _step_locked(self) -> tuple[list[RequestOutput], float]:
        """step() under the lock: its outputs, and how long to sleep once the lock is released."""
        start = time.perf_counter()
        device_before = self.runner.device_time
        previous, self._inflight = self._inflight, None
        dispatched = None
        try:
            batch = self.batcher.schedule()
            dispatched = (None if batch.empty else
                          self.runner.dispatch(batch.decode, batch.prefill, self.kv.block_table, self.kv.slot_pages))
        except BaseException:
            self._inflight = previous  # nothing new is on the device: keep the old step's tokens
            raise
        self.batcher.commit(batch)
        if self.config.async_overlap:
            self._inflight, to_process = dispatched, previous
        else:
            to_process = dispatched
        outputs, self._undelivered = self._undelivered, []
        outputs += [self._output(seq) for seq in self._aborted]
        for seq in self._aborted:
            self._requests.pop(seq.request_id, None)
        self._aborted = []
        if to_process is not None:
            try:
                outputs += self._process(to_process)
            except BaseException as exc:
                self._fail(to_process.sampling, exc)
                raise
        pause = (self._scheduler_pause() if to_process is None and dispatched is None and not self.running
                 and self.batcher.num_waiting else 0.0)
        device = self.runner.device_time - device_before
        self.stats.device_seconds += device
        self.stats.host_seconds += time.perf_counter() - start - device
        return outputs, pause

    def put_back(self, outputs: list[RequestOutput]) -> None:
        """Outputs of step() that belong to another consumer: the next step() returns them again."""
        if outputs:
            with self._lock:
                self._undelivered.extend(outputs)

    def _scheduler_pause(self) -> float:
        """Requests wait but the policy holds them all back (an rpm limit): how long step()
        sleeps before returning — until the first may go, at most 0.1 s — instead of spinning."""
        wakeup = self.scheduler.next_wakeup()
        return 0.0 if wakeup is None else min(0.1, max(0.0, wakeup - time.monotonic()))

    def _process(self, inflight) -> list[RequestOutput]:
        """Read a dispatched step's tokens; append, stop-check, finish, and report. This loop
        runs for every sampled token: it is kept flat (no per-token calls in the common case)."""
        tokens, logprobs, tops = self.runner.collect(inflight)
        now = time.monotonic()
        step_id = inflight.step_id
        charge = self.batcher.charge
        ended, report, appended = [], [], 0
        for seq, token, logprob, top in zip(inflight.sampling, tokens, logprobs, tops):
            if seq.pending_step == step_id:  # (a later dispatch may have set a newer pending row)
                seq.pending_row = -1
            if seq.finish_reason is not None:  # aborted, or finished by the step before: surplus
                continue
            if not -_INF < logprob < _INF:  # NaN/inf logits (the comparison is False for NaN)
                seq.finish_reason, seq.error = "error", NON_FINITE_ERROR
                ended.append(seq)
                continue
            out = seq.output_token_ids
            if not out:
                seq.metrics.first_token_time = now
            out.append(token)
            appended += 1
            seq.num_tokens += 1
            seq.last_token = token
            seq.cumulative_logprob += logprob
            if top is not None:
                seq.output_logprobs.append(top)
            charge(seq, 0, 1)
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
                if token in seq.params.stop_token_ids:
                    seq.stop_reason = token
            elif len(out) >= seq.max_tokens:
                seq.finish_reason = "length"
            if seq.output_kind != "final_only" or seq.params.stop:
                stop = seq.detokenizer.add(out) if seq.detokenizer is not None else None
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
            if seq.finish_reason is not None:
                ended.append(seq)
            elif seq.output_kind != "final_only":
                report.append(seq)
        self.stats.tokens += appended
        for seq in ended:
            self._finish(seq, now)
        self.stats.steps += 1
        outputs = []
        for seq in report:
            out = self._maybe_output(seq)
            if out is not None:
                outputs.append(out)
        return outputs + [self._output(seq) for seq in ended]

    def _fail(self, seqs: list[Sequence], exc: BaseException) -> None:
        """Reading a step's tokens raised: those tokens are lost, and the requests waiting for them
        (counted as computed through them) cannot go on consistently. Each ends with
        finish_reason "error" and the cause, its pages freed; the next step() reports it, as it
        does an abort. The engine serves the rest."""
        now = time.monotonic()
        for seq in seqs:
            if self._requests.get(seq.request_id) is not seq or any(s is seq for s in self._aborted):
                continue  # finished and reported already (or about to be: an abort)
            if seq.finish_reason is None:  # (else it ended in this step, before the failure)
                seq.finish_reason = "error"
                seq.error = f"the engine step computing this request's next token failed: {type(exc).__name__}: {exc}"
            self._finish(seq, now)
            self._aborted.append(seq)

    def _finish(self, seq: Sequence, now: float) -> None:
        if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
            seq.detokenizer.flush(seq.output_token_ids)  # with final_only and no stop: all of it, once
        self.batcher.finish(seq)
        seq.metrics.finished_time = now
        self._requests.pop(seq.request_id, None)

    # ---- outputs --------------------------------------------------------------------------
    def _maybe_output(self, seq: Sequence) -> RequestOutput | None:
        kind = seq.params.output_kind
        if kind == "final_only" and not seq.finished:
            return None
        if kind == "delta" and not seq.finished and seq.sent_tokens == len(seq.output_token_ids):
            return None
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        seq.metrics.num_output_tokens = len(seq.output_token_ids)
        text = seq.detokenizer.stable_text(seq.finished) if seq.detokenizer is not None else ""
        tokens, logprobs = seq.output_token_ids, seq.output_logprobs if seq.params.logprobs is not None else None
        if seq.params.output_kind == "delta":
            text, tokens = text[seq.sent_text:], tokens[seq.sent_tokens:]
            logprobs = logprobs[seq.sent_tokens:] if logprobs is not None else None
            seq.sent_text += len(text)
            seq.sent_tokens += len(tokens)
        completion = CompletionOutput(0, text, list(tokens), seq.cumulative_logprob,
                                      list(logprobs) if logprobs is not None else None,
                                      seq.finish_reason, seq.stop_reason, seq.error)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.finished,
                             seq.lora_request, seq.metrics)

    # ---- streaming ------------------------------------------------------------------------
    def stream(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
               lora_request: LoRARequest | None = None, client: str | None = None) -> Iterator[RequestOutput]:
        """Add a request and step the engine until it finishes, yielding its DELTA outputs (new
        text and tokens). Other requests progress meanwhile; their outputs are handed back
        (put_back) for their own consumers."""
        params = dataclasses.replace(sampling_params or SamplingParams(), output_kind="delta")
        self.add_request(request_id, prompt, params, lora_request, client)
        finished = False
        try:
            while not finished:
                outputs = self.step()
                self.put_back([out for out in outputs if out.request_id != str(request_id)])
                for out in outputs:
                    if out.request_id == str(request_id):
                        finished = out.finished
                        yield out
        finally:
            if not finished:  # the consumer stopped early: free the request's pages
                self.abort(request_id)

    async def astream(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                      lora_request: LoRARequest | None = None, client: str | None = None
                      ) -> AsyncIterator[RequestOutput]:
        """The async form for servers: many coroutines may stream at once; one background task
        steps the engine in a worker thread and routes each request's DELTA outputs to it."""
        params = dataclasses.replace(sampling_params or SamplingParams(), output_kind="delta")
        queue: asyncio.Queue = asyncio.Queue()
        self.add_request(request_id, prompt, params, lora_request, client)  # raises on a duplicate id
        # no await in between: no output can be missed
        self._async_queues[str(request_id)] = (asyncio.get_running_loop(), queue)
        self._async_ids.add(str(request_id))
        self._ensure_stepper()
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            if self._async_queues.pop(str(request_id), None) is not None:
                self.abort(request_id)  # the consumer went away early

    def _ensure_stepper(self) -> None:
        loop = asyncio.get_running_loop()
        # A stepper of another event loop (stopped or closed with the task pending) never runs
        # again: this loop gets its own.
        if self._stepper is None or self._stepper.done() or self._stepper.get_loop() is not loop:
            self._stepper = loop.create_task(self._step_forever())

    async def _step_forever(self) -> None:
        while self._async_queues and self.has_unfinished_requests():
            await asyncio.to_thread(self._step_and_route)

    def _step_and_route(self) -> None:
        """One step, in a worker thread, its outputs routed from there under the step's lock (so
        in step order): a step still running when its stepper's loop closes must not lose the
        outputs of requests streamed on another loop."""
        with self._lock:
            try:
                outputs, pause = self._step_locked()
            except BaseException as err:  # every waiting consumer hears of it
                for request_id in list(self._async_queues):
                    self._deliver(request_id, err)
                raise
            self._route(outputs)
        if pause:
            time.sleep(pause)

    def _route(self, outputs: list[RequestOutput]) -> None:
        # Outputs of requests no astream ever consumed (LLM.generate or stream in another
        # thread, add_request) go back to their consumers; an astream whose consumer left
        # early is aborted and its last output dropped here.
        self.put_back([out for out in outputs if out.request_id not in self._async_ids])
        for out in outputs:
            self._deliver(out.request_id, out)
            if out.finished:
                self._async_queues.pop(out.request_id, None)
                self._async_ids.discard(out.request_id)

    def _deliver(self, request_id: str, item) -> None:
        consumer = self._async_queues.get(request_id)
        if consumer is None:
            return
        loop, queue = consumer
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # its loop is closed: nobody is left to read it, nor to abort it
            self._async_queues.pop(request_id, None)
            self.abort(request_id)