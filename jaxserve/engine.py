"""Engine: requests in, `step()` = schedule -> run -> process outputs, streaming out.

The parts it wires together, each the one owner of its state:
  - loading.py: the model, params and tokenizer, the pool's size;
  - intake.py (RequestIntake): a request -> a validated Sequence (a bad one changes nothing);
  - batching.py (BatchScheduler): running / waiting (through the fairness policy), memory
    (KVManager over the unified pool), preemption, admission, prefill chunks, charging;
  - runner.py (ModelRunner): one packed ragged batch -> forward + sampler on the device;
  - output_processor.py: sampled tokens -> stop conditions -> RequestOutputs;
  - streaming.py: sync and async streams.

With async_overlap (the default) step N+1 is dispatched before step N's tokens are read, so the
host's work overlaps the device's.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from functools import partial
from typing import AsyncIterator, Callable, Iterator

from jaxserve.batching import BatchScheduler
from jaxserve.config import EngineConfig
from jaxserve.distributed import multihost
from jaxserve.distributed.lora_layout import lora_view, pack_split
from jaxserve.distributed.tensor_parallel import POOL_SPEC
from jaxserve.intake import NewAdapters, RequestIntake
from jaxserve.loading import adapter_region, load_model, pool_pages
from jaxserve.lora.request import LoRARequest
from jaxserve.lora.store import AdapterStore
from jaxserve.memory.device_pool import DevicePool
from jaxserve.memory.kv_manager import KVManager
from jaxserve.memory.pool import KV, PagePool
from jaxserve.output_processor import append_tokens, maybe_request_output, request_output
from jaxserve.outputs import RequestOutput
from jaxserve.pallas.ops import check_backend
from jaxserve.runner import ModelRunner
from jaxserve.sampling import SamplingParams
from jaxserve.sched import Scheduler, make_scheduler
from jaxserve.sequence import Sequence
from jaxserve.streaming import AsyncStreams, stream

logger = logging.getLogger("jaxserve")


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
        if config.num_processes > 1:  # before anything touches a device
            multihost.initialize(config.coordinator_address, config.num_processes, config.process_id)
        check_backend(config.kernels)  # fail now, not at the first step
        model = load_model(config)
        self.model_config, self.tokenizer, self.max_model_len, self.dtype = (
            model.config, model.tokenizer, model.max_model_len, model.dtype)
        cfg, params, tp = model.config, model.params, model.tp
        num_pages = pool_pages(config, model, tp and tp.local_cfg.kv_size)
        self.pool = PagePool(num_pages, config.page_size, adapter_pages=adapter_region(config, model, num_pages))
        self.device_pool = DevicePool(cfg.num_layers, num_pages, config.page_size, (tp.cfg if tp else cfg).kv_size,
                                      self.dtype, sharding=tp and tp.sharding(POOL_SPEC))
        logger.info("%s pool: %d pages of %d tokens = %.1f MiB (%d tokens of KV if no adapter)",
                    config.adapter_memory, num_pages, config.page_size, self.device_pool.nbytes / 2**20,
                    self.pool.capacity(KV) * config.page_size)
        # Under TP each device holds its part of every adapter (distributed/lora_layout.py).
        split = {} if tp is None else dict(pack=partial(pack_split, model_cfg=cfg))
        self.adapters = AdapterStore(lora_view(tp.cfg, tp.size, tp.lora_scheme) if tp else cfg, self.pool, self.device_pool,
                                     config.max_lora_rank, self.dtype, config.lora_modules,
                                     padded=config.adapter_memory == "padded", **split)
        self.kv = KVManager(self.pool, self.adapters, watermark_pages=max(1, self.pool.capacity(KV) // 100),
                            max_num_seqs=config.max_num_seqs, max_pages_per_seq=self.pool.pages_for(self.max_model_len),
                            max_loras=config.max_loras)
        self.runner = ModelRunner(cfg, params, self.device_pool, self.adapters, self.kv.slots,
                                  max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, max_loras=config.max_loras, kernels=config.kernels, tp=tp)
        self.scheduler = (config.scheduler if isinstance(config.scheduler, Scheduler)
                          else make_scheduler(config.scheduler, **(config.scheduler_options or {})))
        self.batcher = BatchScheduler(self.scheduler, self.kv, max_num_seqs=config.max_num_seqs,
                                      max_num_batched_tokens=config.max_num_batched_tokens)
        self.intake = RequestIntake(cfg, self.tokenizer, self.max_model_len, self.pool, self.adapters,
                                    config.max_lora_rank, config.seed)
        self._streams = AsyncStreams(self)
        self._requests: dict[str, Sequence] = {}  # unfinished (or not yet reported) requests by id
        self._aborted: list[Sequence] = []        # ended outside a step's tokens: reported next step
        # Outputs a step() caller took but does not own (LLM.generate, stream, the async stepper
        # each want only their own requests): handed back, the next step() returns them first.
        self._undelivered: list[RequestOutput] = []
        self._inflight = None  # a dispatched step whose tokens are not processed yet
        self._lock = threading.RLock()  # step() and add/abort from other threads (async serving)
        self.stats = StepStats()
        if config.warmup:
            self.runner.warmup()
        if config.num_processes > 1 and config.process_id == 0:  # the followers repeat its device calls
            self.runner.mirror = self.device_pool.mirror = multihost.Leader(config.coordinator_address,
                                                                            config.num_processes - 1)
        self.load_time = time.perf_counter() - start

    # ---- adapters -------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Register an adapter: validated, packed and kept in host memory; it takes pool pages
        only while requests need it (or until evicted)."""
        self.register_loras(self.load_loras([lora_request]))

    def load_loras(self, lora_requests) -> NewAdapters:
        """Read and check adapters not registered yet, changing nothing (no lock: a server does
        the slow file reads off its stepping thread)."""
        return self.intake.load_new_adapters(lora_requests)

    def register_loras(self, new: NewAdapters) -> None:
        with self._lock:
            for req, adapter, _ in new.values():
                if req.lora_name not in self.adapters:  # (another caller may have been first)
                    self.adapters.register(req, adapter)

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
    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None, client: str | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. A bad one raises ValueError (or AdapterError) and changes nothing."""
        self.add_requests([(request_id, prompt, sampling_params, lora_request, client, arrival_time)])

    def add_requests(self, requests) -> None:
        """Queue several (request_id, prompt, params, lora_request[, client[, arrival_time]])
        at once, all or none: any bad one raises and none is queued."""
        requests = [tuple(r) + (None,) * (6 - len(r)) for r in requests]
        with self._lock:
            ids = [str(r[0]) for r in requests]
            seen: set[str] = set()
            for request_id in ids:
                if request_id in self._requests or request_id in seen:
                    raise ValueError(f"request_id {request_id!r} is already in use")
                seen.add(request_id)
            new = self.intake.load_new_adapters([r[3] for r in requests])
            seqs = [self.intake.make_sequence(*r, new_adapters=new) for r in requests]
            self.register_loras(new)
            for seq in seqs:
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
            seq.finish("abort")
            if seq.detokenizer is not None:
                seq.detokenizer.flush(seq.output_token_ids)
            seq.metrics.finished_time = time.monotonic()
            self._aborted.append(seq)
            return True

    def abort_all(self) -> int:
        """Abort every unfinished request (a server shutting down); how many there were."""
        with self._lock:
            return sum(self.abort(request_id) for request_id in list(self._requests))

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
        return {s.client for s in self.waiting()}

    def waiting(self) -> list[Sequence]:
        """Requests waiting for admission (new or preempted)."""
        return [s for s in self._requests.values() if s.slot < 0 and not s.finished]

    def num_unfinished_requests(self) -> int:
        return len(self.running) + self.batcher.num_waiting

    # ---- the step -------------------------------------------------------------------------
    def step(self, route: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """Schedule and dispatch one batch; process the results of the previous batch (with
        async_overlap, while this one runs on the device) or of this one (without). route, if
        given, receives the outputs under the step's lock (in step order, whatever the thread)."""
        with self._lock:
            outputs, pause = self._step_locked()
            if route is not None:
                route(outputs)
        if pause:  # outside the lock: add_request / abort from other threads go on meanwhile
            time.sleep(pause)
        return outputs

    def _step_locked(self) -> tuple[list[RequestOutput], float]:
        start = time.perf_counter()
        device_before = self.runner.device_time
        previous, self._inflight = self._inflight, None
        # Tokens the previous step sampled that nobody has read yet: their sequences know one
        # token more than they hold, and feed it to the device from there.
        pending = previous.rows if previous is not None else {}
        try:
            batch = self.batcher.schedule(pending)
            dispatched = None if batch.empty else self.runner.dispatch(batch.decode, batch.prefill, pending)
        except BaseException:
            self._inflight = previous  # nothing new is on the device: keep the old step's tokens
            raise
        self.batcher.commit(batch)
        if self.config.async_overlap:
            self._inflight, to_process = dispatched, previous
        else:
            to_process = dispatched
        outputs, self._undelivered = self._undelivered, []
        outputs += [request_output(seq) for seq in self._aborted]
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
        """Read a dispatched step's tokens; append, stop-check, finish, and report."""
        tokens, logprobs, tops = self.runner.collect(inflight)
        now = time.monotonic()
        report, ended, appended = append_tokens(inflight.sampling, tokens, logprobs, tops, now, self.batcher.charge)
        self.stats.tokens += appended
        self.stats.steps += 1
        for seq in ended:
            self._finish(seq, now)
        outputs = [out for out in map(maybe_request_output, report) if out is not None]
        return outputs + [request_output(seq) for seq in ended]

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
                seq.finish("error", error=f"the engine step computing this request's next token failed: "
                                          f"{type(exc).__name__}: {exc}")
            self._finish(seq, now)
            self._aborted.append(seq)

    def _finish(self, seq: Sequence, now: float) -> None:
        if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
            seq.detokenizer.flush(seq.output_token_ids)  # with final_only and no stop: all of it, once
        self.batcher.finish(seq)
        seq.metrics.finished_time = now
        self._requests.pop(seq.request_id, None)

    # ---- streaming ------------------------------------------------------------------------
    def stream(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
               lora_request: LoRARequest | None = None, client: str | None = None) -> Iterator[RequestOutput]:
        """Add a request and step the engine until it finishes, yielding its DELTA outputs."""
        return stream(self, request_id, prompt, sampling_params, lora_request, client)

    def astream(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                lora_request: LoRARequest | None = None, client: str | None = None
                ) -> AsyncIterator[RequestOutput]:
        """The async form for servers: many coroutines may stream at once (streaming.py)."""
        return self._streams.astream(request_id, prompt, sampling_params, lora_request, client)
