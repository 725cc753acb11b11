"""The server under load and faults (disconnects, failing steps), its API key, and per-tenant
fairness through HTTP (tiny model, CPU, 127.0.0.1). Every loop is bounded in count and time."""
import asyncio
import json
import random
import time

import httpx
import openai
import pytest

from conftest import TINY, lora_request
from served import Served, metrics, value
from test_server import ADAPTERS, LLM_GREEDY, tiny_engine

from jaxserve.engine import Engine
from jaxserve.fairness.metrics import vtc_bound
from jaxserve.memory.pool import KV

MODELS = ("tiny", *ADAPTERS)


async def _stream(client, body: dict, headers: dict, read_events: int | None):
    """POST a streaming completion; read every SSE event, or only read_events of them and then
    hang up. Returns (text, finish_reason, saw [DONE])."""
    text, finish, done, seen = "", None, False, 0
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if read_events is not None and seen >= read_events:
                break  # leaving the block closes the connection mid-stream
            seen += 1
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish, done


def test_200_concurrent_streams_with_disconnects(tiny_llm, golden):
    """200 streams from 5 tenants over the base model and two adapters, a fifth of them hung up
    at random points (and a few plain requests given up by their clients): every other stream
    gets its full greedy text (LLM.generate's); afterwards no request runs or waits, no KV page
    is held, no adapter is pinned (read from /metrics), and the server logged no error."""
    rng = random.Random(0)
    cases = [(m, p) for m in MODELS for p in range(4)]
    prompts = {(m, p): golden["tiny-llama"]["base" if m == "tiny" else m]["prompts"][p] for m, p in cases}
    expected = {}
    for (m, p), ids in prompts.items():
        lora = None if m == "tiny" else lora_request(m)
        expected[m, p] = tiny_llm.generate({"prompt_token_ids": ids}, LLM_GREEDY, lora, use_tqdm=False)[0].outputs[0].text
    hang_up = set(rng.sample(range(200), 40))
    plan = [(cases[i % len(cases)], f"tenant-{i % 5}", rng.randint(0, 8) if i in hang_up else None)
            for i in range(200)]

    with Served(tiny_engine()) as s:
        async def give_up(client, i):  # a plain request whose client stops waiting
            body = {"model": "qv-r4", "prompt": [1], "max_tokens": 60, "ignore_eos": True}
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json=body, timeout=0.2 + 0.1 * i)

        async def main():
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
            async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=limits) as client:
                streams = [_stream(client, {"model": m, "prompt": prompts[m, p], "max_tokens": 12, "temperature": 0,
                                            "ignore_eos": True, "stream": True}, {"x-tenant-id": tenant}, cut)
                           for (m, p), tenant, cut in plan]
                return await asyncio.wait_for(asyncio.gather(*streams, *(give_up(client, i) for i in range(4))), 240)

        start = time.monotonic()
        results = asyncio.run(main())[:200]
        completed = 0
        for ((m, p), tenant, cut), (text, finish, done) in zip(plan, results):
            if cut is None:
                assert (text, finish, done) == (expected[m, p], "length", True), (m, p, tenant)
                completed += 1
        assert completed == 160
        with httpx.Client() as c:
            deadline = time.monotonic() + 30
            while True:
                m = metrics(c, s.url)
                busy = value(m, "vllm:num_requests_running") + value(m, "vllm:num_requests_waiting")
                if busy == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert busy == 0
        assert value(m, "jaxserve:pool_pages", kind="kv") == 0
        assert value(m, "jaxserve:adapters", state="pinned") == 0
        assert value(m, "vllm:request_success_total", finished_reason="abort") >= 4  # (the plain ones at least)
        assert value(m, "vllm:request_success_total", finished_reason="length") >= 160
        assert sum(value(m, "jaxserve:tenant_service_tokens_total", tenant=f"tenant-{t}", kind="generation")
                   for t in range(5)) >= 160 * 12
        print(f"200 streams (40 hung up) + 4 abandoned requests in {time.monotonic() - start:.1f} s")
    assert not s.error_messages(), s.error_messages()


def test_api_key_guards_every_endpoint_but_health():
    engine = tiny_engine()
    with Served(engine, api_key="s3cret") as s, httpx.Client(base_url=s.url, timeout=60) as c:
        calls = [("GET", "/v1/models", None), ("GET", "/version", None), ("GET", "/metrics", None),
                 ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
                 ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 2}),
                 ("POST", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": str(TINY / "adapters" / "qv-r4")}),
                 ("POST", "/v1/unload_lora_adapter", {"lora_name": "z"})]
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Bearer s3cret-not"}):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
            assert ("z" in engine.list_loras()) == (path == "/v1/unload_lora_adapter")  # refused: no change
            r = c.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, (path, r.text)
        assert c.get("/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="qv-r4", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def _fairness_run(scheduler: str):
    """Tenants A and B, A sending 3x B's requests (interleaved A A A B), all at once at a server
    that runs 4 sequences at a time; /metrics is sampled throughout. Returns the samples and the
    engine's max batch tokens."""
    engine = Engine(model=str(TINY), max_model_len=32, max_num_seqs=4, max_num_batched_tokens=32,
                    scheduler=scheduler, seed=0)
    samples = []
    with Served(engine) as s:
        async def request(client, i, tenant):
            body = {"model": "tiny", "prompt": [1 + (7 * i + k) % 300 for k in range(12)], "max_tokens": 10,
                    "temperature": 0, "ignore_eos": True}
            r = await client.post("/v1/completions", json=body, headers={"x-tenant-id": tenant})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10

        async def sample(client, stop):
            while not stop.is_set():
                m = metrics_from(await client.get("/metrics"))
                samples.append({t: (value(m, "jaxserve:tenant_service_total", tenant=t),
                                    value(m, "jaxserve:tenant_waiting_requests", tenant=t)) for t in "AB"})
                await asyncio.sleep(0.02)

        async def main():
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=limits) as client:
                stop = asyncio.Event()
                sampler = asyncio.ensure_future(sample(client, stop))
                tasks = []
                for i in range(120):
                    tasks.append(asyncio.ensure_future(request(client, i, "B" if i % 4 == 3 else "A")))
                    await asyncio.sleep(0.002)  # arrival order A A A B ...
                await asyncio.wait_for(asyncio.gather(*tasks), 240)
                stop.set()
                await sampler

        asyncio.run(main())
    assert not s.error_messages()
    return samples, engine.config.max_num_seqs * engine.max_model_len


def metrics_from(response):
    from prometheus_client.parser import text_string_to_metric_families
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def backlogged_difference(samples) -> tuple[float, int]:
    """max - min of (service A - service B) over the samples where both tenants wait, and how
    many such samples there were."""
    both = [sa - sb for (sa, wa), (sb, wb) in ((x["A"], x["B"]) for x in samples) if wa > 0 and wb > 0]
    return (max(both) - min(both) if both else 0.0), len(both)


def test_fairness_through_http_vtc_within_its_bound_fcfs_not():
    results = {name: _fairness_run(name) for name in ("vtc", "fcfs")}
    bound = vtc_bound(1, 2, 12, results["vtc"][1])  # 2U, U = max(w_p x input, w_q x batch tokens)
    d_vtc, n_vtc = backlogged_difference(results["vtc"][0])
    d_fcfs, n_fcfs = backlogged_difference(results["fcfs"][0])
    print(f"backlogged service difference: VTC {d_vtc:.0f} ({n_vtc} samples), FCFS {d_fcfs:.0f} ({n_fcfs}); "
          f"2U = {bound:.0f}")
    assert n_vtc >= 5 and n_fcfs >= 5  # both really were backlogged together for a while
    assert d_vtc <= bound < d_fcfs


def test_failed_steps_are_500s_in_openais_shape_and_the_server_goes_on(golden):
    """Reading a step's tokens fails once: that request gets a 500 naming the cause (plain) or an
    error event then [DONE] (streamed); the next request is served. Dispatch failing step after
    step: after three in a row every request ends (a 500), and once steps work again so does the
    server."""
    engine = tiny_engine()
    collect, dispatch, calls = engine.runner.collect, engine.runner.dispatch, []

    def collect_failing_every_fourth(inflight):
        calls.append(1)
        if len(calls) % 4 == 0:
            raise RuntimeError("device lost")
        return collect(inflight)

    def dispatch_failing(*args, **kwargs):
        raise RuntimeError("out of device memory")

    engine.runner.collect = collect_failing_every_fourth
    body = {"model": "qv-r4", "prompt": golden["tiny-llama"]["qv-r4"]["prompts"][1], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    with Served(engine) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "server_error" and "device lost" in r.json()["error"]["message"]
        calls.clear()
        events = [line for line in c.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
                  if line.startswith("data: ")]
        assert "device lost" in json.loads(events[-2][6:])["error"]["message"] and events[-1] == "data: [DONE]"
        engine.runner.collect = collect
        ok = c.post("/v1/completions", json=body).json()
        assert ok["usage"]["completion_tokens"] == 12 and c.get("/health").status_code == 200
        engine.runner.dispatch = dispatch_failing
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500 and "3 steps in a row" in r.json()["error"]["message"]
        assert "out of device memory" in r.json()["error"]["message"]
        engine.runner.dispatch = dispatch
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == ok["choices"][0]["text"]
        assert c.get("/health").status_code == 200
    assert not engine.has_unfinished_requests() and engine.pool.num_used(KV) == 0
