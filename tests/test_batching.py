"""The BatchScheduler is the one batch former of the engine and the simulator: on the same
workload (memory never short, a constant step time on both clocks) the simulator and the real
engine form step for step the same batches and give every request the same first-token and
finish times; a change to the batch scheduler shows up in both."""
import pytest

from conftest import TINY

from jaxserve.batching import BatchScheduler, Chunk
from jaxserve.engine import Engine
from jaxserve.sched import make_scheduler
from jaxserve.fairness.replay import replay
from jaxserve.fairness.sim import CostModel, TokenMemory, _sequence, simulate
from jaxserve.fairness.workloads import Request

STEP = 0.05


def workload():
    """Two clients, one at twice the other's rate, with varied lengths (chunked prefills)."""
    reqs = []
    for c, rate in enumerate((5.0, 10.0)):
        reqs += [Request(f"client{c}", (i + 0.3 * c) / rate, 3 + (7 * i + c) % 40, 2 + (5 * i) % 9)
                 for i in range(int(2.0 * rate))]
    return sorted(reqs, key=lambda r: r.arrival)


def both(policy: str):
    engine = Engine(model=str(TINY), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                    async_overlap=False, scheduler=make_scheduler(policy), seed=0, warmup=False)
    real = replay(engine, workload(), step_seconds=STEP)
    sim = simulate(workload(), make_scheduler(policy), kv_capacity=100_000, max_num_seqs=4,
                   max_num_batched_tokens=32, cost=CostModel(a=STEP, b=0, c=0, d=0), fuse=False)
    return real, sim


def batches(result):
    """Per step: tokens processed (prefill, decode), the running batch's size and what each
    client was charged (prompt tokens processed for the first time, tokens sampled)."""
    return [(s.prefill, s.decode, s.batch, sorted(s.service.items())) for s in result.steps if s.steps]


def prefill_per_step(result):
    return [s.prefill for s in result.steps if s.steps]


def times(result):
    return [(r.client, r.input_len, round(r.first_token, 9), round(r.finish, 9), r.output_len)
            for r in result.requests]


@pytest.mark.parametrize("policy", ["vtc", "fcfs"])
def test_simulator_and_engine_form_the_same_batches(policy):
    real, sim = both(policy)
    assert batches(real) == batches(sim)
    assert any(p > 0 and d > 0 for s in sim.steps for p, d in s.service.values())  # mixed steps
    assert any(s.prefill + s.decode == 32 for s in sim.steps)  # the token budget splits prompts
    assert times(real) == times(sim)


def test_a_batch_scheduler_change_shows_in_both(monkeypatch):
    before_real, before_sim = both("vtc")

    def small_chunks(self, budget):  # prefill chunks of at most 8 tokens
        chunks = []
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1 and budget > 0:
                length = min(remaining, budget, 8)
                chunks.append(Chunk(seq, seq.num_computed_tokens, length, length == remaining))
                budget -= length
        return chunks
    monkeypatch.setattr(BatchScheduler, "_prefill_chunks", small_chunks)
    real, sim = both("vtc")
    assert batches(real) == batches(sim) != batches(before_sim)
    assert max(prefill_per_step(sim)) < max(prefill_per_step(before_sim))


def test_the_newest_running_sequence_is_preempted_when_memory_is_short():
    memory = TokenMemory(24)
    batcher = BatchScheduler(make_scheduler("fcfs"), memory, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [_sequence(i, Request("c", float(i), 5, 10)) for i in range(3)]
    for seq in seqs:
        batcher.add(seq)
    batch = batcher.schedule()  # 6 tokens of room each: all three admitted (18 of 24)
    assert batch.admitted == seqs and [c.length for c in batch.prefill] == [5, 5, 5]
    batcher.commit(batch)
    for step in range(1, 10):  # all decode, their claims growing a token a step: 6 free for three
        for seq in seqs:
            seq.append_token(0)
        batch = batcher.schedule()
        batcher.commit(batch)
        if batch.preempted:
            break
    assert step == 4  # (claims 6, 7, 8 each; the fourth growth finds nothing free)
    assert batch.preempted == [seqs[2]] and batcher.running == seqs[:2]
    assert seqs[2].num_computed_tokens == 0 and seqs[2].metrics.num_preemptions == 1
    assert memory.free + sum(memory.held.values()) == 24 and memory.free >= 0
    batcher.finish(seqs[0])
    assert seqs[0] not in memory.held and batcher.running == [seqs[1]]
