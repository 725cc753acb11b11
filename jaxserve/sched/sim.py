"""A discrete-event simulator of the engine's continuous batching, for fairness experiments.

It drives the SAME scheduler objects the engine uses (jaxserve.sched) through the same calls —
add / schedule(try_admit, limit) / charge / requeue / finish — with stand-in requests carrying the
Sequence fields a scheduler reads, against:

* a cost model: step time = a + b * prefill_tokens + c * decode_tokens + d * batch_size
  (`CostModel.fit` fits it to measured (prefill, decode[, batch], seconds) samples);
* a token-capacity memory model: the KV cache holds `kv_capacity` tokens (10,000 is the paper's
  A10G setting); a running request holds its input + generated tokens; admission needs room for
  its tokens + 1; a decoding request grows by one token per step, and when the cache is full the
  most recently admitted running request is preempted (recompute: its tokens are freed, it goes
  back to the scheduler and later re-prefills prompt + generated tokens, charged only for prompt
  tokens never charged before — as the engine does).

Each step mirrors `Engine.step`: every running request with one token to process decodes (after
claiming its room, preempting the newest when short); the scheduler offers admissions under
`max_num_seqs` and the token budget left after decode tokens (`max_num_batched_tokens`); prefill
chunks follow in admission order under that budget (long prompts split across steps); prefill is
charged when processed, each decoded token when sampled. Requests arrive by their arrival times
on a virtual clock; with nothing to run the clock jumps to the next arrival (or the scheduler's
`next_wakeup()`, e.g. RPM's). A scheduler with a `clock` attribute gets the virtual clock.

Speed: consecutive pure-decode steps in which nothing can change the schedule (no arrival, no
finish, no room for any waiting request) are fused into one record of `steps` identical steps;
their decode tokens are charged in one call per request. A 10-minute trace of thousands of
requests simulates in about a second.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from typing import Iterable, Sequence as Seq

import numpy as np

from jaxserve.sched.base import Scheduler
from jaxserve.sched.workloads import Request


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


WAITING, RUNNING, FINISHED, REJECTED, PENDING = range(5)


class SimSeq:
    """The Sequence fields a scheduler reads, plus the simulator's own state."""
    __slots__ = ("request_id", "client", "arrival_time", "order", "prompt_token_ids",
                 "num_prompt_tokens", "max_tokens", "num_tokens", "output_token_ids",
                 "num_computed_tokens", "num_charged_prefill", "finish_reason", "lora_name",
                 "held", "state", "first_token_time", "finish_time", "num_preemptions",
                 "first_scheduled_time")

    def __init__(self, i: int, r: Request):
        self.request_id = str(i)
        self.client = r.client
        self.arrival_time = float(r.arrival)
        self.order = i
        self.prompt_token_ids = range(int(r.input_len))  # only its length is read
        self.num_prompt_tokens = int(r.input_len)
        self.max_tokens = int(r.output_len)
        self.num_tokens = self.num_prompt_tokens
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_charged_prefill = 0
        self.finish_reason = None
        self.lora_name = r.adapter
        self.held = 0
        self.state = PENDING
        self.first_token_time = None
        self.finish_time = None
        self.first_scheduled_time = None
        self.num_preemptions = 0

    @property
    def pending(self) -> bool:
        return False

    def __repr__(self):
        return f"SimSeq({self.request_id}, {self.client}, in={self.num_prompt_tokens}, out={len(self.output_token_ids)}/{self.max_tokens})"


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
    wall = time.perf_counter()
    reqs = sorted(workload, key=lambda r: r.arrival)
    seqs = [SimSeq(i, r) for i, r in enumerate(reqs)]
    for s in seqs:
        if s.num_tokens + 1 > cfg.kv_capacity or s.num_prompt_tokens + s.max_tokens > cfg.kv_capacity:
            raise ValueError(f"request {s.request_id} ({s.num_prompt_tokens}+{s.max_tokens} tokens) "
                             f"can never fit kv_capacity={cfg.kv_capacity}")
    clock = [0.0]
    if hasattr(scheduler, "clock"):
        scheduler.clock = lambda: clock[0]
    cost = cfg.cost
    cap, max_seqs, mbt = cfg.kv_capacity, cfg.max_num_seqs, cfg.max_num_batched_tokens
    charge = scheduler.charge

    n = len(seqs)
    i = 0
    now = 0.0
    free = cap
    running: list[SimSeq] = []
    wcount: dict[str, int] = {}
    wheap: list = []
    backlog = frozenset()
    dirty = False
    steps: list[StepRecord] = []
    preemptions = 0
    idle_with_fit = 0

    def set_waiting(s: SimSeq) -> None:
        nonlocal dirty
        s.state = WAITING
        c = wcount.get(s.client, 0)
        wcount[s.client] = c + 1
        if c == 0:
            dirty = True
        heapq.heappush(wheap, (s.num_tokens + 1, s.order, s))

    def min_waiting_need() -> int | None:
        while wheap:
            need, _, s = wheap[0]
            if s.state == WAITING and s.num_tokens + 1 == need:
                return need
            heapq.heappop(wheap)
        return None

    def preempt(s: SimSeq) -> None:
        nonlocal free, preemptions
        running.remove(s)
        free += s.held
        s.held = 0
        s.num_computed_tokens = 0
        s.num_preemptions += 1
        preemptions += 1
        set_waiting(s)
        scheduler.requeue(s)

    until = cfg.until
    while True:
        if until is not None and now >= until:
            break
        clock[0] = now
        while i < n and seqs[i].arrival_time <= now:
            s = seqs[i]
            i += 1
            set_waiting(s)
            scheduler.add(s)
        for s in scheduler.drain_rejected():
            s.state = REJECTED
            s.finish_reason = "abort"
            wcount[s.client] -= 1
            dirty = True
        if not running and len(scheduler) == 0:
            if i >= n:
                break
            now = seqs[i].arrival_time
            continue

        # 1. decoders claim room for their token; the newest running request is preempted when short
        decode = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        before = preemptions
        for s in decode:
            if s.state == RUNNING and s.held < s.num_tokens:
                need = s.num_tokens - s.held
                while s.state == RUNNING and free < need:
                    preempt(running[-1])
                if s.state == RUNNING:
                    free -= need
                    s.held = s.num_tokens
        if preemptions != before:
            decode = [s for s in decode if s.state == RUNNING]
        n_dec = len(decode)

        # 2. admissions in the policy's order
        budget = mbt - n_dec
        admitted = []

        def try_admit(s: SimSeq) -> bool:
            nonlocal budget, free
            if budget <= 0:
                return False
            need = s.num_tokens + 1
            if need > free:
                return False
            free -= need
            s.held = need
            s.state = RUNNING
            if s.first_scheduled_time is None:
                s.first_scheduled_time = now
            running.append(s)
            admitted.append(s)
            budget -= s.num_tokens - s.num_computed_tokens
            return True

        if len(scheduler) and len(running) < max_seqs:
            scheduler.schedule(try_admit, max_seqs - len(running))
        for s in admitted:
            c = wcount[s.client] - 1
            wcount[s.client] = c
            if c == 0:
                dirty = True
            if s.num_tokens - s.num_computed_tokens == 1:
                decode.append(s)
        n_dec = len(decode)
        if dirty:
            backlog = frozenset(c for c, k in wcount.items() if k)
            dirty = False

        # 3. prefill chunks in admission order under the budget left after decode tokens
        chunks = []
        pb = mbt - n_dec
        prefill_tokens = 0
        if pb > 0:
            for s in running:
                rem = s.num_tokens - s.num_computed_tokens
                if rem > 1:
                    ln = rem if rem < pb else pb
                    chunks.append((s, ln))
                    prefill_tokens += ln
                    pb -= ln
                    if pb <= 0:
                        break

        if not decode and not chunks:  # nothing to run: idle until something can change
            nxt = seqs[i].arrival_time if i < n else None
            w = scheduler.next_wakeup()
            if w is not None and w > now:
                nxt = w if nxt is None else min(nxt, w)
            if nxt is None:
                raise RuntimeError(f"simulation stuck at t={now:.3f}: {len(scheduler)} waiting, nothing admissible")
            need = min_waiting_need()
            if need is not None and need <= free and not running:
                idle_with_fit += 1
            steps.append(StepRecord(now, nxt - now, 0, 0, 0, 0, {}, backlog))
            now = nxt
            continue

        batch = len(running)
        dt = cost.step_time(prefill_tokens, n_dec, batch)
        k = 1
        if cfg.fuse and not chunks and not admitted and n_dec == batch:
            k = min(s.max_tokens - len(s.output_token_ids) for s in decode)
            if k > 1:
                k = min(k, 1 + free // n_dec)
            if k > 1 and len(scheduler) and batch < max_seqs and mbt - n_dec > 0:
                need = min_waiting_need()
                if need is not None and need <= free:
                    k = 1
            if k > 1 and i < n:
                k = min(k, max(1, math.ceil((seqs[i].arrival_time - now) / dt - 1e-9)))
            if k > 1 and len(scheduler):
                w = scheduler.next_wakeup()
                if w is not None:
                    k = min(k, max(1, math.ceil((w - now) / dt - 1e-9)))
            if k > 1 and until is not None:
                k = min(k, max(1, math.ceil((until - now) / dt - 1e-9)))

        # 4. account (as Engine._account): advance the cache, charge new prompt tokens
        service: dict = {}
        for s in decode:
            pos = s.num_computed_tokens
            s.num_computed_tokens = pos + 1
            if pos < s.num_prompt_tokens:
                new = pos + 1 - s.num_charged_prefill
                if new > 0:
                    s.num_charged_prefill = pos + 1
                    charge(s, new, 0)
                    p, d = service.get(s.client, (0, 0))
                    service[s.client] = (p + new, d)
        sampled = list(decode)
        for s, ln in chunks:
            end = s.num_computed_tokens + ln
            new = min(end, s.num_prompt_tokens) - s.num_charged_prefill
            s.num_computed_tokens = end
            if new > 0:
                s.num_charged_prefill += new
                charge(s, new, 0)
                p, d = service.get(s.client, (0, 0))
                service[s.client] = (p + new, d)
            if end == s.num_tokens:
                sampled.append(s)

        # 5. process (as Engine._process): sample, charge each decoded token, finish
        start = now
        now = start + k * dt
        clock[0] = now
        ended = False
        for s in sampled:
            out = s.output_token_ids
            if not out:
                s.first_token_time = start + dt
            if k == 1:
                out.append(0)
                s.num_tokens += 1
                charge(s, 0, 1)
            else:
                out.extend([0] * k)
                s.num_tokens += k
                s.num_computed_tokens += k - 1
                grow = s.num_tokens - 1 - s.held
                if grow > 0:
                    free -= grow
                    s.held += grow
                charge(s, 0, k)
            p, d = service.get(s.client, (0, 0))
            service[s.client] = (p, d + k)
            if len(out) >= s.max_tokens:
                s.finish_reason = "length"
                s.state = FINISHED
                s.finish_time = now
                free += s.held
                s.held = 0
                ended = True
                scheduler.finish(s)
        if ended:
            running = [s for s in running if s.state == RUNNING]
        steps.append(StepRecord(start, now - start, k, prefill_tokens, n_dec * k, batch, service, backlog))
        assert free >= 0, "memory model went negative"

    records = [RequestRecord(s.request_id, s.client, s.arrival_time, s.first_token_time, s.finish_time,
                             s.num_prompt_tokens, len(s.output_token_ids), s.num_preemptions,
                             s.state == REJECTED)
               for s in seqs]
    end = max([s.finish_time for s in seqs if s.finish_time is not None] + [0.0])
    if until is not None and now >= until:
        end = now  # stopped by the clock: the run lasted until then
    return SimResult(getattr(scheduler, "name", type(scheduler).__name__), cfg, records, steps, end,
                     preemptions, time.perf_counter() - wall, idle_with_fit)
