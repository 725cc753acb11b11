"""The continuous-batching engine: batch invariance (alone, mixed, preempted), abort, random
interleavings, streaming, bounded compilation, metrics."""
import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import ADAPTERS, TINY, lora_request

from jaxserve import SamplingParams
from jaxserve.engine import Engine
from jaxserve.memory.pool import KV
from jaxserve.runtime import backend_compiles

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def run_to_completion(engine, max_steps=10_000):
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("engine did not finish")


def golden_cases(golden):
    return [(a, i) for a in ("base",) + ADAPTERS for i in range(4)]


def add_mixed_batch(engine, golden, rng):
    """The 16 golden cases, each twice, plus 8 fillers of other lengths: 40 requests."""
    cases = golden_cases(golden) * 2
    order = rng.permutation(len(cases))
    for k in order:
        adapter, i = cases[k]
        engine.add_request(f"g{k}", {"prompt_token_ids": golden["tiny-llama"][adapter]["prompts"][i]}, GREEDY,
                           None if adapter == "base" else lora_request(adapter))
    for k in range(8):
        prompt = rng.integers(3, 380, rng.integers(2, 40)).tolist()
        engine.add_request(f"f{k}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 20)), ignore_eos=True),
                           lora_request(ADAPTERS[k % 3]) if k % 2 else None)
    return cases


def check_golden(finished, cases, golden):
    for k, (adapter, i) in enumerate(cases):
        assert finished[f"g{k}"].outputs[0].token_ids == golden["tiny-llama"][adapter]["greedy"][i], (adapter, i)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("pool_pages,page_size", [(None, 16), (44, 4)])
def test_batch_invariance_and_preemption(golden, pool_pages, page_size, overlap):
    """40 requests with different adapters and lengths in one engine — with room for all, and
    with a pool so small that running requests are preempted and recomputed; with and without
    the async overlap — every golden request still yields HF's tokens."""
    engine = Engine(model=str(TINY), max_model_len=64, max_num_seqs=32, max_num_batched_tokens=64,
                    page_size=page_size, num_pool_pages=pool_pages, async_overlap=overlap)
    cases = add_mixed_batch(engine, golden, np.random.default_rng(0))
    finished = run_to_completion(engine)
    check_golden(finished, cases, golden)
    assert len(finished) == 40
    if pool_pages is not None:
        assert engine.num_preemptions > 0
        assert sum(o.metrics.num_preemptions for o in finished.values()) == engine.num_preemptions
    assert engine.pool.num_used(KV) == 0 and engine.adapters.metrics()["adapters_pinned"] == 0


def test_abort_mid_generation_frees_pages(golden):
    engine = Engine(model=str(TINY), max_model_len=64, num_pool_pages=64)
    entry = golden["tiny-llama"]["qv-r4"]
    for i in range(4):
        engine.add_request(f"keep{i}", {"prompt_token_ids": entry["prompts"][i]}, GREEDY, lora_request("qv-r4"))
    engine.add_request("gone", {"prompt_token_ids": entry["prompts"][2]},
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), lora_request("all-r8-rslora"))
    for _ in range(5):
        engine.step()
    used = engine.pool.num_used(KV)
    assert engine.abort("gone") and not engine.abort("gone") and not engine.abort("nope")
    assert engine.pool.num_used(KV) < used
    finished = run_to_completion(engine)
    assert finished["gone"].outputs[0].finish_reason == "abort"
    assert 0 < len(finished["gone"].outputs[0].token_ids) < 40
    for i in range(4):
        assert finished[f"keep{i}"].outputs[0].token_ids == entry["greedy"][i]
    assert engine.pool.num_used(KV) == 0
    engine.remove_lora("all-r8-rslora")  # no longer pinned


@pytest.mark.parametrize("overlap", [True, False])
def test_random_add_abort_step_interleavings(overlap):
    """200 random operations: no page leaks, no request lost (each ends finished or aborted)."""
    rng = np.random.default_rng(7)
    engine = Engine(model=str(TINY), max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32,
                    page_size=4, num_pool_pages=80, async_overlap=overlap)  # the rank-8 all-module adapter alone takes 32
    added, ended, n = set(), {}, 0
    for _ in range(200):
        op = rng.choice(["add", "abort", "step", "step"])
        if op == "add":
            rid = f"r{n}"
            n += 1
            engine.add_request(rid, {"prompt_token_ids": rng.integers(3, 380, rng.integers(1, 30)).tolist()},
                               SamplingParams(temperature=float(rng.choice([0.0, 1.0])), max_tokens=int(rng.integers(1, 25)),
                                              ignore_eos=bool(rng.integers(2))),
                               lora_request(ADAPTERS[rng.integers(3)]) if rng.integers(2) else None)
            added.add(rid)
        elif op == "abort" and added:
            engine.abort(rng.choice(sorted(added)))
        else:
            for out in engine.step():
                if out.finished:
                    assert out.request_id not in ended, "finished twice"
                    ended[out.request_id] = out.outputs[0].finish_reason
    ended.update({k: v.outputs[0].finish_reason for k, v in run_to_completion(engine).items()})
    assert set(ended) == added
    assert set(ended.values()) <= {"stop", "length", "abort"}
    assert engine.pool.num_used(KV) == 0 and engine.adapters.metrics()["adapters_pinned"] == 0
    assert engine.pool.num_free + engine.pool.num_used("adapter") == engine.pool.num_pages


def test_streaming_equals_non_streamed(tiny_llm):
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True, logprobs=1)
    whole = tiny_llm.generate({"prompt_token_ids": [1, 300, 362]}, params)[0].outputs[0]
    deltas = list(engine.stream("s1", {"prompt_token_ids": [1, 300, 362]}, params))
    assert "".join(d.outputs[0].text for d in deltas) == whole.text
    assert sum((d.outputs[0].token_ids for d in deltas), []) == whole.token_ids
    assert sum((d.outputs[0].logprobs for d in deltas), []) == whole.logprobs
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])



def test_seeded_request_ignores_its_neighbours_filters(tiny_llm):
    """A seeded request's tokens are its own: alone, next to greedy requests, or next to one that
    uses top-k/top-p (which makes the step sample in the "filtered" mode)."""
    seeded = ({"prompt_token_ids": [1, 300, 362]}, SamplingParams(temperature=1.0, seed=1234, max_tokens=16,
                                                                ignore_eos=True))
    alone = tiny_llm.generate(*seeded)[0].outputs[0].token_ids
    for neighbour in (SamplingParams(temperature=0, max_tokens=16),
                      SamplingParams(temperature=0.9, top_k=5, top_p=0.7, seed=7, max_tokens=16)):
        outputs = tiny_llm.generate([seeded[0], {"prompt_token_ids": [1, 42, 43]}], [seeded[1], neighbour])
        assert outputs[0].outputs[0].token_ids == alone

def test_streamed_stop_string_never_shows_past_the_stop(tiny_llm):
    engine = tiny_llm.engine
    free = tiny_llm.generate({"prompt_token_ids": [1, 42]}, GREEDY)[0].outputs[0]
    stop = free.text[6:10]  # likely spans tokens
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    deltas = list(engine.stream("s2", {"prompt_token_ids": [1, 42]}, params))
    streamed = "".join(d.outputs[0].text for d in deltas)
    assert streamed == free.text[:free.text.index(stop)]
    assert deltas[-1].outputs[0].finish_reason == "stop" and deltas[-1].outputs[0].stop_reason == stop


def test_async_streams_run_concurrently(tiny_llm):
    engine = tiny_llm.engine
    params = [SamplingParams(temperature=0, max_tokens=8 + i, ignore_eos=True) for i in range(3)]
    expected = tiny_llm.generate([{"prompt_token_ids": [1, 50 + i]} for i in range(3)], params)

    async def consume(i):
        text = ""
        async for out in engine.astream(f"a{i}", {"prompt_token_ids": [1, 50 + i]}, params[i]):
            text += out.outputs[0].text
        return text

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(3)))
    assert asyncio.run(main()) == [e.outputs[0].text for e in expected]


def test_no_compile_after_warmup():
    """Warm-up compiles every shape; 100 requests of varied lengths, adapters and sampling
    settings then run no XLA compilation (first uses load warm-up's executables)."""
    engine = Engine(model=str(TINY), max_model_len=64, max_num_seqs=16, max_num_batched_tokens=64,
                    num_pool_pages=60, warmup=True)
    assert engine.runner.compile_seconds > 0 and engine.runner.shape_variants()
    before = backend_compiles()
    rng = np.random.default_rng(3)
    for k in range(100):
        prompt = rng.integers(3, 380, rng.integers(1, 50)).tolist()
        params = SamplingParams(temperature=float(rng.choice([0, 0.7])), top_k=int(rng.choice([-1, 5])),
                                top_p=float(rng.choice([1.0, 0.9])), logprobs=rng.choice([None, 3]),
                                max_tokens=int(rng.integers(1, 64 - len(prompt))), ignore_eos=True)
        engine.add_request(f"c{k}", {"prompt_token_ids": prompt}, params,
                           lora_request(ADAPTERS[k % 3]) if k % 3 else None)
        if k % 10 == 9:
            for _ in range(int(rng.integers(1, 8))):
                engine.step()
    run_to_completion(engine)
    assert backend_compiles() == before


def test_request_metrics_and_client(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("m1", {"prompt_token_ids": [1, 2, 3]}, GREEDY, lora_request("qv-r4"))
    engine.add_request("m2", {"prompt_token_ids": [1, 2]}, GREEDY, client="acme")
    assert engine._requests["m1"].client == "qv-r4" and engine._requests["m2"].client == "acme"
    finished = run_to_completion(engine)
    m = finished["m1"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert (m.num_prompt_tokens, m.num_output_tokens, m.num_preemptions) == (3, 12, 0)
    assert m.time_to_first_token >= 0 and m.time_in_queue >= 0


def test_add_request_rejections_change_nothing(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("dup", {"prompt_token_ids": [1]}, GREEDY)
    with pytest.raises(ValueError, match="'dup' is already in use"):
        engine.add_request("dup", {"prompt_token_ids": [1]}, GREEDY)
    with pytest.raises(ValueError, match="client=''"):
        engine.add_request("c", {"prompt_token_ids": [1]}, GREEDY, client="")
    small = Engine(model=str(TINY), max_model_len=64, num_pool_pages=2, page_size=16)
    with pytest.raises(ValueError, match="need 4 pages; the pool has 2: this request could never run"):
        small.add_request("big", {"prompt_token_ids": [1] * 30}, SamplingParams(max_tokens=20))
    assert not small.has_unfinished_requests()
    run_to_completion(engine)


def test_adapter_in_use_cannot_be_removed_from_engine(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("u", {"prompt_token_ids": [1, 2]}, GREEDY, lora_request("all-r8-rslora"))
    engine.step()
    with pytest.raises(RuntimeError, match="in use by 1 unfinished request"):
        engine.remove_lora("all-r8-rslora")
    run_to_completion(engine)
    engine.remove_lora("all-r8-rslora")
    assert "all-r8-rslora" not in engine.list_loras()


def test_adapter_of_a_waiting_request_cannot_be_removed(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("w", {"prompt_token_ids": [1, 2]}, GREEDY, lora_request("regex-r16-pattern"))
    with pytest.raises(RuntimeError, match="in use by 1 unfinished request"):
        engine.remove_lora("regex-r16-pattern")  # still waiting: never admitted yet
    run_to_completion(engine)


def test_closing_a_stream_early_aborts_it(tiny_llm):
    engine = tiny_llm.engine
    stream = engine.stream("early", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=40, ignore_eos=True))
    next(stream)
    stream.close()
    run_to_completion(engine)
    assert engine.pool.num_used(KV) == 0 and not engine.has_unfinished_requests()


def test_aborted_final_only_request_keeps_its_text(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("fo", {"prompt_token_ids": [1, 42]},
                       SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, output_kind="final_only"))
    for _ in range(6):
        engine.step()
    engine.abort("fo")
    out = run_to_completion(engine)["fo"].outputs[0]
    assert out.finish_reason == "abort" and out.token_ids
    assert out.text == tiny_llm.get_tokenizer().decode(out.token_ids)


def test_generate_ignores_other_requests_in_the_engine(tiny_llm, golden):
    tiny_llm.engine.add_request("other", {"prompt_token_ids": [1, 5]}, SamplingParams(max_tokens=2))
    entry = golden["tiny-llama"]["base"]
    out = tiny_llm.generate({"prompt_token_ids": entry["prompts"][1]}, GREEDY)
    assert out[0].outputs[0].token_ids == entry["greedy"][1]
    run_to_completion(tiny_llm.engine)


def test_budget_below_max_num_seqs_is_rejected():
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 is invalid; allowed: at least max_num_seqs=128"):
        Engine(model=str(TINY), max_num_batched_tokens=8)


@pytest.mark.parametrize("error", [RuntimeError("device lost"), KeyboardInterrupt()])
@pytest.mark.parametrize("async_overlap", [True, False])
def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_goes_on(golden, monkeypatch, error,
                                                                              async_overlap):
    """Reading a step's tokens raises (an XLA error, Ctrl-C): the step's requests finish with
    finish_reason "error" and the cause, their pages are freed, the engine serves the rest:
    requests added afterwards get their golden tokens, and nothing stays unfinished."""
    engine = Engine(model=str(TINY), max_model_len=64, async_overlap=async_overlap)
    entry = golden["tiny-llama"]["base"]
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": entry["prompts"][i]},
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    collect, calls = engine.runner.collect, []

    def failing_once(inflight):
        calls.append(len(calls))
        if len(calls) == 3:
            raise error
        return collect(inflight)
    monkeypatch.setattr(engine.runner, "collect", failing_once)
    finished = {}
    with pytest.raises(type(error)):
        for _ in range(100):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
    engine.add_request("after", {"prompt_token_ids": entry["prompts"][3]},
                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finished.update(run_to_completion(engine))
    assert set(finished) == {"r0", "r1", "r2", "after"}
    for i in range(3):
        out = finished[f"r{i}"].outputs[0]
        assert out.finish_reason == "error" and type(error).__name__ in out.error
        assert out.token_ids == entry["greedy"][i][:len(out.token_ids)]  # what it had was right
    assert finished["after"].outputs[0].token_ids == entry["greedy"][3]
    assert engine.pool.num_used(KV) == 0 and not engine.running


class ScriptedPool(ThreadPoolExecutor):
    """A one-thread executor whose job i starts only once wait_for[i] is set and sets
    then_set[i] when it ends: it puts an event loop's worker-thread steps in a chosen order."""

    def __init__(self, wait_for=None, then_set=None):
        super().__init__(max_workers=1)
        self.wait_for, self.then_set, self.submitted = wait_for or {}, then_set or {}, 0

    def submit(self, fn, /, *args, **kwargs):
        index, self.submitted = self.submitted, self.submitted + 1

        def job():
            if index in self.wait_for:
                assert self.wait_for[index].wait(60)
            try:
                return fn(*args, **kwargs)
            finally:
                if index in self.then_set:
                    self.then_set[index].set()
        return super().submit(job)


def test_astream_after_its_first_event_loop_was_closed(tiny_llm):
    """A stream's event loop is closed while its stepper's next step waits in a worker thread (a
    notebook restarting its loop). That orphaned step runs later, after a stream on a new loop
    has begun, and reads that stream's first token: the token must still reach the new stream."""
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = tiny_llm.generate({"prompt_token_ids": [1, 77]}, params)[0].outputs[0].text
    new_loop_stepped, orphan_stepped = threading.Event(), threading.Event()

    first = asyncio.new_event_loop()
    first_pool = ScriptedPool(wait_for={2: new_loop_stepped}, then_set={2: orphan_stepped})
    first.set_default_executor(first_pool)
    stream = engine.astream("dead-loop", {"prompt_token_ids": [1, 76]}, params)

    async def first_token_then_orphan_a_step():
        await stream.__anext__()  # with async_overlap its first token takes two steps
        while first_pool.submitted < 3:  # the stepper has asked for its third
            await asyncio.sleep(0.01)
    first.run_until_complete(first_token_then_orphan_a_step())
    first.close()
    engine.abort("dead-loop")

    async def consume():
        text = ""
        async for out in engine.astream("new-loop", {"prompt_token_ids": [1, 77]}, params):
            text += out.outputs[0].text
        return text
    second = asyncio.new_event_loop()
    # The new stepper's first step dispatches the new prompt; the orphan then reads its token.
    second.set_default_executor(ScriptedPool(wait_for={1: orphan_stepped}, then_set={0: new_loop_stepped}))
    try:
        assert second.run_until_complete(asyncio.wait_for(consume(), timeout=60)) == expected
    finally:
        second.close()
    assert orphan_stepped.is_set() and not engine.has_unfinished_requests()


def test_generate_from_several_threads_and_engine_requests_beside_it(tiny_llm, golden):
    """Four threads call LLM.generate on one LLM at once while a request added through
    llm.engine runs too: every caller gets exactly its own outputs (golden tokens), and the
    engine request's output is not swallowed by generate."""
    import threading
    entry = golden["tiny-llama"]["base"]
    engine = tiny_llm.engine
    engine.add_request("llm-0", {"prompt_token_ids": entry["prompts"][0]}, GREEDY)  # an id generate used to pick
    results, errors = {}, []

    def call(t):
        try:
            results[t] = tiny_llm.generate([{"prompt_token_ids": entry["prompts"][(t + j) % 4]} for j in range(3)],
                                           GREEDY)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=call, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in threads), "a generate call hung or failed"
    for t in range(4):
        assert [o.outputs[0].token_ids for o in results[t]] == [entry["greedy"][(t + j) % 4] for j in range(3)]
    mine = run_to_completion(engine)
    assert mine["llm-0"].outputs[0].token_ids == entry["greedy"][0]


def test_importing_jaxserve_or_making_an_engine_changes_no_process_state():
    """Warning filters, jax.config, compile listeners and gc.freeze are the entry points' to set
    (runtime.setup_process): a library user's process is left as it was."""
    import subprocess
    import sys
    script = f"""
import gc, warnings, jax
before = (list(warnings.filters), jax.config.jax_compilation_cache_dir, gc.get_freeze_count())
import jaxserve, jaxserve.engine, jaxserve.llm, jaxserve.pallas.ops, jaxserve.fairness.sim
from jaxserve.engine import Engine
from jaxserve.runtime import backend_compiles
engine = Engine(model={str(TINY)!r}, max_model_len=32, max_num_seqs=2, max_num_batched_tokens=16, warmup=False)
after = (list(warnings.filters), jax.config.jax_compilation_cache_dir, gc.get_freeze_count())
assert before == after, (before, after)
assert backend_compiles() is None
print("unchanged")
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "unchanged" in done.stdout, done.stderr[-2000:]


def test_add_requests_is_all_or_none(tiny_llm):
    """A batch of requests with a repeated id, or one bad prompt, queues none of them."""
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0, max_tokens=2)
    good = ("all-or-none-1", {"prompt_token_ids": [1, 2]}, params, None)
    with pytest.raises(ValueError, match="request_id 'twice' is already in use"):
        engine.add_requests([good, ("twice", {"prompt_token_ids": [3]}, params, None),
                             ("twice", {"prompt_token_ids": [4]}, params, None)])
    with pytest.raises(ValueError, match="prompt_token_ids=\\[\\] is invalid"):
        engine.add_requests([good, ("empty", {"prompt_token_ids": []}, params, None)])
    assert not engine.has_unfinished_requests()
    engine.add_requests([good])  # its id was never taken
    while engine.has_unfinished_requests():
        engine.step()
