"""Replay a workload through the real engine, recording what the simulator records.

The same per-step and per-request records as `sim.simulate` (a `SimResult`), so every metric and
plot in metrics.py / plots.py applies to a real run too. Requests arrive at their workload times
on one of two clocks:

- wall (default): workload seconds = real seconds x `speedup` since the start;
- virtual (`step_seconds=x`): every engine step advances the clock by x seconds, and idle time
  jumps to the next arrival — deterministic, whatever the machine's speed (what the tests use).

Each request becomes `input_len` random prompt tokens (seeded) and `output_len` greedy tokens
(ignore_eos), scaled by `length_scale` to fit a small model, through its "adapter" when one is
given for that name (S-LoRA style: each client its own adapter, loaded into the pool on demand). The service a step records is what
the engine charged the scheduler for that step (tokens actually processed; a preemption's
recomputation excluded); a client counts as backlogged in a step when it has requests waiting.
"""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np

from jaxserve.sampling import SamplingParams
from jaxserve.fairness.sim import RequestRecord, SimConfig, SimResult, StepRecord
from jaxserve.fairness.workloads import Request


def scaled_lengths(r: Request, length_scale: float) -> tuple[int, int]:
    return max(1, round(r.input_len * length_scale)), max(1, round(r.output_len * length_scale))


def replay(engine, workload: Iterable[Request], *, step_seconds: float | None = None, speedup: float = 1.0,
           length_scale: float = 1.0, seed: int = 0, until: float | None = None,
           adapters: dict | None = None, progress=None) -> SimResult:
    """adapters: {adapter name: LoRARequest} for the workload's "adapter" fields (requests whose
    adapter is not in it run on the base model). progress: a tqdm-like bar, updated per finished
    request."""
    adapters = adapters or {}
    requests = sorted(workload, key=lambda r: r.arrival)
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    for r in requests:  # check every request first: a bad one must not leave half a run behind
        inp, out = scaled_lengths(r, length_scale)
        if inp + out > engine.max_model_len:
            raise ValueError(f"a {r.client} request needs {inp} + {out} tokens; the engine's max_model_len is "
                             f"{engine.max_model_len} (lower length_scale or raise max_model_len)")
    wall_start = time.perf_counter()
    now = 0.0

    def clock() -> float:
        return now if step_seconds is not None else (time.perf_counter() - wall_start) * speedup

    if hasattr(engine.scheduler, "clock"):  # (rpm) the policy's clock is the workload's
        engine.scheduler.clock = clock
    step_service: dict[str, list[int]] = {}

    def record(seq, prefill, decode):
        got = step_service.setdefault(seq.client, [0, 0])
        got[0] += prefill
        got[1] += decode

    engine.batcher.add_charge_listener(record)
    records: dict[str, RequestRecord] = {}
    steps: list[StepRecord] = []
    params = {}
    preemptions0 = engine.num_preemptions
    next_arrival = 0
    try:
        while next_arrival < len(requests) or engine.has_unfinished_requests():
            now = clock()
            if until is not None and now >= until:
                break
            while next_arrival < len(requests) and requests[next_arrival].arrival <= now:
                r = requests[next_arrival]
                inp, out = scaled_lengths(r, length_scale)
                rid = f"w{next_arrival}"
                if out not in params:
                    params[out] = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True, output_kind="delta")
                engine.add_request(rid, {"prompt_token_ids": rng.integers(3, vocab, inp).tolist()}, params[out],
                                   adapters.get(r.adapter), client=r.client, arrival_time=r.arrival)
                records[rid] = RequestRecord(rid, r.client, r.arrival, None, None, inp, 0)
                next_arrival += 1
            if not engine.has_unfinished_requests():  # idle until the next arrival
                gap = requests[next_arrival].arrival - now
                if step_seconds is not None:
                    now += gap
                else:
                    time.sleep(max(0.0, gap / speedup))
                steps.append(StepRecord(now - gap, gap, 0, 0, 0, 0, {}, frozenset()))
                continue
            step_service.clear()
            start = now
            outputs = engine.step()
            if step_seconds is not None:
                now += step_seconds
            else:
                now = clock()
            for o in outputs:
                rec = records[o.request_id]
                completion = o.outputs[0]
                if completion.token_ids and rec.first_token is None:
                    rec.first_token = now
                rec.output_len += len(completion.token_ids)
                if o.finished:
                    if progress is not None:
                        progress.update(1)
                    rec.finish = now
                    rec.rejected = completion.finish_reason == "abort"
                    rec.num_preemptions = o.metrics.num_preemptions
            waiting = frozenset(engine.waiting_clients())
            service = {c: (p, d) for c, (p, d) in step_service.items()}
            batch = engine.batcher.last_batch  # (what this step dispatched)
            steps.append(StepRecord(start, now - start, 1, batch.num_prefill_tokens, len(batch.decode),
                                    batch.num_running, service, waiting))
    finally:
        engine.batcher.remove_charge_listener(record)
    # The most KV tokens a running batch can hold (the theorem's M): the pool, or fewer when
    # max_num_seqs full-length sequences take less.
    config = SimConfig(kv_capacity=min(engine.pool.num_pages * engine.pool.page_size,
                                       engine.config.max_num_seqs * engine.max_model_len),
                       max_num_seqs=engine.config.max_num_seqs,
                       max_num_batched_tokens=engine.config.max_num_batched_tokens)
    name = getattr(engine.scheduler, "name", type(engine.scheduler).__name__)
    return SimResult(name, config, list(records.values()), steps, now, engine.num_preemptions - preemptions0,
                     time.perf_counter() - wall_start)
