"""A discrete-event simulator of the engine's continuous batching, for fairness experiments.

It drives the engine's own batch former — `jaxserve.batching.BatchScheduler`, with the same
policy objects (jaxserve.sched) — so decoders' growth and preemption, admission and prefill
chunking and charging are the engine's, not a copy. What it swaps in:

* requests: `Sequence`s made from workload lengths (their tokens are never real);
* memory: `TokenMemory`, a KV cache of `kv_capacity` tokens (10,000 is the paper's A10G
  setting): admission takes a request's tokens + 1, decoding grows the claim token by token;
* the model: a cost model, step time = a + b * prefill_tokens + c * decode_tokens + d * batch_size
  (`CostModel.fit` fits it to measured (prefill, decode[, batch], seconds) samples); every
  sampling sequence gets a token each step, and the clock advances by the step time.

Requests arrive by their arrival times on a virtual clock; with nothing to run the clock jumps to
the next arrival (or the policy's `next_wakeup()`, e.g. RPM's). A policy with a `clock` attribute
gets the virtual clock.

Speed (a simulator-only fast path): consecutive pure-decode steps in which nothing can change the
schedule (no arrival, no finish, no room for any waiting request) are fused into one record of
`steps` identical steps; their decode tokens are charged in one call per request. A 10-minute
trace of thousands of requests simulates in one to two seconds.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from typing import Iterable, Sequence as Seq

import numpy as np

from jaxserve.batching import BatchScheduler, ScheduledBatch
from jaxserve.outputs import RequestMetrics
from jaxserve.sampling import SamplingParams
from jaxserve.sched.base import Scheduler
from jaxserve.fairness.workloads import Request
from jaxserve.sequence import Sequence


@dataclasses.dataclass
class CostModel:
    """Seconds per engine step. The default is sized so that the VTC paper's real trace runs at
    about the published throughput (~780 tokens/s, a Llama-7B on an A10G under S-LoRA)."""
    a: float = 0.022      # per step
    b: float = 0.00022    # per prefill token
    c: float = 0.0009     # per decode token
    d: float = 0.0        # per request in the batch

    def step_time(self, prefill: int, decode: int, batch: int = 0) -> float:
        return self.a + self.b * prefill + self.c * decode + self.d * batch

    @classmethod
    def fit(cls, samples: Iterable[Seq[float]], with_batch: bool | None = None) -> "CostModel":
        """Least squares over (prefill, decode, seconds) or (prefill, decode, batch, seconds)
        samples; the batch term is fitted only with 4-tuples (or with_batch=True)."""
        rows = [tuple(float(x) for x in s) for s in samples]
        if not rows:
            raise ValueError("fit needs samples")
        four = len(rows[0]) == 4 if with_batch is None else with_batch
        if four and len(rows[0]) != 4:
            raise ValueError("with_batch needs (prefill, decode, batch, seconds) samples")
        X = np.array([(1.0, r[0], r[1]) + ((r[2],) if four else ()) for r in rows])
        y = np.array([r[-1] for r in rows])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        return cls(*(float(v) for v in coef)) if four else cls(*(float(v) for v in coef), 0.0)


@dataclasses.dataclass
class SimConfig:
    kv_capacity: int = 10_000           # KV cache tokens
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096  # tokens per step (decode + prefill chunks)
    cost: CostModel = dataclasses.field(default_factory=CostModel)
    fuse: bool = True                   # fuse identical decode steps (exact; only faster)
    until: float | None = None          # stop the clock here (later requests stay unfinished)

    def __post_init__(self):
        for name in ("kv_capacity", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SimConfig.{name}={value!r} is invalid; allowed: an integer >= 1")
        if not isinstance(self.cost, CostModel):
            raise ValueError(f"SimConfig.cost={self.cost!r} is invalid; allowed: a CostModel")
        if self.until is not None and not (isinstance(self.until, (int, float)) and math.isfinite(self.until)):
            raise ValueError(f"SimConfig.until={self.until!r} is invalid; allowed: None or a finite number of seconds")


class TokenMemory:
    """The simulator's memory model for the BatchScheduler: the KV cache holds `capacity` tokens;
    admission takes a request's tokens + 1 (room for its next token); decoding grows its claim
    token by token."""

    def __init__(self, capacity: int):
        self.capacity = self.free = capacity
        self.held: dict[Sequence, int] = {}  # running requests' claims

    @staticmethod
    def admission_need(seq: Sequence) -> int:
        return seq.num_tokens + 1

    def can_admit(self, seq: Sequence, num_running: int) -> bool:
        return seq.num_tokens + 1 <= self.free

    def admit(self, seq: Sequence) -> None:
        need = seq.num_tokens + 1
        self.free -= need
        self.held[seq] = seq.capacity = need

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = num_tokens - self.held[seq]
        if need <= 0:
            return True
        if need > self.free:
            return False
        self.free -= need
        self.held[seq] = seq.capacity = num_tokens
        return True

    def release(self, seq: Sequence) -> None:
        self.free += self.held.pop(seq)
        seq.capacity = 0


# Simulated requests sample nothing: their lengths come from the workload.
_SIM_PARAMS = SamplingParams(ignore_eos=True)


def _sequence(i: int, r: Request) -> Sequence:
    seq = Sequence(str(i), None, range(int(r.input_len)), _SIM_PARAMS, 0, int(r.output_len), client=r.client,
                   arrival_time=float(r.arrival), order=i)  # (only the prompt's length is read)
    seq.metrics = RequestMetrics(arrival_time=seq.arrival_time, num_prompt_tokens=seq.num_prompt_tokens)
    return seq


@dataclasses.dataclass
class RequestRecord:
    request_id: str
    client: str
    arrival: float
    first_token: float | None     # time its first output token was sampled (None: never)
    finish: float | None
    input_len: int
    output_len: int               # tokens generated
    num_preemptions: int = 0
    rejected: bool = False

    @property
    def first_token_latency(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclasses.dataclass
class StepRecord:
    """One step, or `steps` identical fused decode steps, or (steps == 0) an idle period."""
    time: float
    duration: float
    steps: int
    prefill: int                  # prefill tokens processed (recomputation included)
    decode: int                   # decode tokens processed
    batch: int                    # running requests
    service: dict                 # client -> (charged prefill tokens, decode tokens)
    backlogged: frozenset         # clients with requests waiting (after admission)


@dataclasses.dataclass
class SimResult:
    scheduler: str
    config: SimConfig
    requests: list[RequestRecord]
    steps: list[StepRecord]
    end_time: float
    num_preemptions: int
    wall_seconds: float
    idle_with_fit: int = 0        # idle periods although a waiting request fit (work conservation)

    def throughput(self) -> float:
        """Tokens (input + output) of requests processed per second of the run (a preempted
        request's recomputation is not counted again)."""
        tok = sum(p + d for st in self.steps for p, d in st.service.values())
        return tok / self.end_time if self.end_time > 0 else 0.0

    @property
    def clients(self) -> list[str]:
        return sorted({r.client for r in self.requests})


def simulate(workload: Iterable[Request], scheduler: Scheduler, config: SimConfig | None = None,
             **overrides) -> SimResult:
    """Run `workload` through `scheduler` on the simulated server; overrides set SimConfig
    fields (kv_capacity=..., cost=..., until=...)."""
    cfg = dataclasses.replace(config or SimConfig(), **overrides)
    return _Simulation(workload, scheduler, cfg).run()


class _Simulation:
    """One run: the virtual clock, arrivals, the BatchScheduler over TokenMemory, the cost
    model, and the records."""

    def __init__(self, workload: Iterable[Request], policy: Scheduler, cfg: SimConfig):
        self.cfg, self.policy = cfg, policy
        self.wall = time.perf_counter()
        self.seqs = [_sequence(i, r) for i, r in enumerate(sorted(workload, key=lambda r: r.arrival))]
        for s in self.seqs:
            if s.num_tokens + 1 > cfg.kv_capacity or s.num_prompt_tokens + s.max_tokens > cfg.kv_capacity:
                raise ValueError(f"request {s.request_id} ({s.num_prompt_tokens}+{s.max_tokens} tokens) "
                                 f"can never fit kv_capacity={cfg.kv_capacity}")
        self.now = 0.0
        if hasattr(policy, "clock"):
            policy.clock = self.clock
        self.memory = TokenMemory(cfg.kv_capacity)
        self.batcher = BatchScheduler(policy, self.memory, max_num_seqs=cfg.max_num_seqs,
                                      max_num_batched_tokens=cfg.max_num_batched_tokens, clock=self.clock)
        self.service: dict[str, tuple[int, int]] = {}  # this step's charges per client
        self.batcher.add_charge_listener(self._record_charge)
        self.steps: list[StepRecord] = []
        self.idle_with_fit = 0
        # Who is backlogged (requests waiting), kept incrementally: counts per client, and a heap
        # of waiting requests by admission need (stale entries skipped) for the fusion check.
        self.waiting_count: dict[str, int] = {}
        self.backlog: frozenset = frozenset()
        self.backlog_changed = False
        self.need_heap: list = []

    def clock(self) -> float:
        return self.now

    def _record_charge(self, seq: Sequence, prefill: int, decode: int) -> None:
        p, d = self.service.get(seq.client, (0, 0))
        self.service[seq.client] = (p + prefill, d + decode)

    def _waiting(self, seq: Sequence, delta: int) -> None:
        count = self.waiting_count.get(seq.client, 0) + delta
        self.waiting_count[seq.client] = count
        if count == (1 if delta > 0 else 0):
            self.backlog_changed = True
        if delta > 0:
            heapq.heappush(self.need_heap, (TokenMemory.admission_need(seq), seq.order, seq))

    def _min_waiting_need(self) -> int | None:
        heap = self.need_heap
        while heap:
            need, _, s = heap[0]
            if s not in self.memory.held and s.finish_reason is None and TokenMemory.admission_need(s) == need:
                return need
            heapq.heappop(heap)
        return None

    def run(self) -> SimResult:
        cfg, seqs, batcher = self.cfg, self.seqs, self.batcher
        n, i = len(seqs), 0
        until = cfg.until
        while True:
            if until is not None and self.now >= until:
                break
            while i < n and seqs[i].arrival_time <= self.now:
                self._waiting(seqs[i], +1)
                for rejected in batcher.add(seqs[i]):
                    self._waiting(rejected, -1)
                i += 1
            if not batcher.has_unfinished():
                if i >= n:
                    break
                self.now = seqs[i].arrival_time
                continue
            self.service = {}
            batch = batcher.schedule()
            for s in batch.preempted:
                self._waiting(s, +1)
            for s in batch.admitted:
                self._waiting(s, -1)
            if self.backlog_changed:
                self.backlog = frozenset(c for c, k in self.waiting_count.items() if k)
                self.backlog_changed = False
            if batch.empty:  # nothing to run: idle until something can change
                self._idle(seqs[i].arrival_time if i < n else None)
                continue
            prefill_tokens, num_decode, num_running = batch.num_prefill_tokens, len(batch.decode), batch.num_running
            dt = cfg.cost.step_time(prefill_tokens, num_decode, num_running)
            k = self._fusable_steps(batch, dt, seqs[i].arrival_time if i < n else None) if cfg.fuse else 1
            batcher.commit(batch)
            start, self.now = self.now, self.now + k * dt
            self._sample(batch, k, start + dt)
            self.steps.append(StepRecord(start, self.now - start, k, prefill_tokens, num_decode * k, num_running,
                                         self.service, self.backlog))
            assert self.memory.free >= 0, "memory model went negative"
        return self._result()

    def _idle(self, next_arrival: float | None) -> None:
        nxt = next_arrival
        wakeup = self.policy.next_wakeup()
        if wakeup is not None and wakeup > self.now:
            nxt = wakeup if nxt is None else min(nxt, wakeup)
        if nxt is None:
            raise RuntimeError(f"simulation stuck at t={self.now:.3f}: {len(self.policy)} waiting, nothing admissible")
        need = self._min_waiting_need()
        if need is not None and need <= self.memory.free and not self.batcher.running:
            self.idle_with_fit += 1
        self.steps.append(StepRecord(self.now, nxt - self.now, 0, 0, 0, 0, {}, self.backlog))
        self.now = nxt

    def _fusable_steps(self, batch: ScheduledBatch, dt: float, next_arrival: float | None) -> int:
        """The simulator's fast path: how many identical pure-decode steps can run as one, none of
        them able to change the schedule (no arrival, wakeup or finish, no room for a waiting
        request, no preemption)."""
        decode, running, cfg = batch.decode, self.batcher.running, self.cfg
        if batch.prefill or batch.admitted or len(decode) != len(running):
            return 1
        k = min(s.max_tokens - len(s.output_token_ids) for s in decode)
        if k > 1:
            k = min(k, 1 + self.memory.free // len(decode))
        waiting = len(self.policy)
        if k > 1 and waiting and len(running) < cfg.max_num_seqs and cfg.max_num_batched_tokens - len(decode) > 0:
            need = self._min_waiting_need()
            if need is not None and need <= self.memory.free:
                return 1
        for t in (next_arrival, self.policy.next_wakeup() if waiting else None, cfg.until):
            if k > 1 and t is not None:
                k = min(k, max(1, math.ceil((t - self.now) / dt - 1e-9)))
        return k

    def _sample(self, batch: ScheduledBatch, k: int, first_token_time: float) -> None:
        """Each sampling sequence gets k tokens (k > 1: fused decode steps), charged when sampled."""
        sampled = batch.decode + [c.seq for c in batch.prefill if c.wants_token]
        for s in sampled:
            out = s.output_token_ids
            if not out:
                s.metrics.first_token_time = first_token_time
            s.append_placeholder_tokens(k)
            if k > 1:
                s.num_computed_tokens += k - 1
                if s.num_tokens - 1 > s.capacity:
                    assert self.memory.grow(s, s.num_tokens - 1)  # (k is bounded by the free memory)
            self.batcher.charge(s, 0, k)
            if len(out) >= s.max_tokens:
                s.finish("length")
                s.metrics.finished_time = self.now
                self.batcher.finish(s)

    def _result(self) -> SimResult:
        seqs = self.seqs
        records = [RequestRecord(s.request_id, s.client, s.arrival_time, s.metrics.first_token_time,
                                 s.metrics.finished_time if s.finish_reason == "length" else None,
                                 s.num_prompt_tokens, len(s.output_token_ids), s.metrics.num_preemptions,
                                 s.finish_reason == "abort")
                   for s in seqs]
        end = max([r.finish for r in records if r.finish is not None] + [0.0])
        if self.cfg.until is not None and self.now >= self.cfg.until:
            end = self.now  # stopped by the clock: the run lasted until then
        return SimResult(getattr(self.policy, "name", type(self.policy).__name__), self.cfg, records, self.steps,
                         end, self.batcher.num_preemptions, time.perf_counter() - self.wall, self.idle_with_fit)
