"""The OpenAI-compatible server through the official `openai` SDK (sync and async, streaming
and not) and raw HTTP: every endpoint, output equal to LLM.generate's, adapters loaded and
unloaded at run time, bad input, and /metrics. Tiny model on CPU, server on 127.0.0.1."""
import asyncio
import json
import math

import httpx
import openai
import pytest

from conftest import TINY, lora_request
from served import Served, metrics, value

from jaxserve import SamplingParams
from jaxserve.engine import Engine

ADAPTERS = ("qv-r4", "all-r8-rslora")
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
LLM_GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def tiny_engine(**kwargs) -> Engine:
    """The tiny_llm fixture's configuration (same batch shapes: compiled once for both)."""
    engine = Engine(model=str(TINY), max_model_len=64, max_loras=4, max_lora_rank=16, **kwargs)
    for name in ADAPTERS:
        engine.add_lora(lora_request(name))
    return engine


@pytest.fixture(scope="module")
def served():
    with Served(tiny_engine()) as s:
        yield s
    assert not s.error_messages()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def llm_text(tiny_llm, prompt, model):
    lora = None if model == "tiny" else lora_request(model)
    return tiny_llm.generate(prompt, LLM_GREEDY, lora, use_tqdm=False)[0].outputs[0]


def test_models_lists_the_base_model_and_every_adapter(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", *ADAPTERS}
    assert models["tiny"].parent is None and models["tiny"].max_model_len == 64
    for name in ADAPTERS:
        assert models[name].parent == "tiny" and models[name].root == str(TINY / "adapters" / name)


@pytest.mark.parametrize("model", ["tiny", *ADAPTERS])
def test_greedy_text_equals_llm_generate(client, tiny_llm, golden, model):
    """Completions (token-id and text prompts, plain and streamed) and chat give LLM's text."""
    prompts = golden["tiny-llama"]["base" if model == "tiny" else model]["prompts"][1:3]
    for ids in prompts:
        expected = llm_text(tiny_llm, {"prompt_token_ids": ids}, model)
        assert expected.token_ids == golden["tiny-llama"]["base" if model == "tiny" else model]["greedy"][
            golden["tiny-llama"]["base" if model == "tiny" else model]["prompts"].index(ids)]
        got = client.completions.create(model=model, prompt=ids, **GREEDY)
        assert got.choices[0].text == expected.text and got.choices[0].finish_reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 12)
        chunks = list(client.completions.create(model=model, prompt=ids, stream=True, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == "length"
    text = "the quick brown fox"
    assert client.completions.create(model=model, prompt=text, **GREEDY).choices[0].text == \
        llm_text(tiny_llm, text, model).text
    messages = [{"role": "user", "content": "hello there"}]
    lora = None if model == "tiny" else lora_request(model)
    expected = tiny_llm.chat(messages, LLM_GREEDY, lora, use_tqdm=False)[0].outputs[0].text
    reply = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected


def test_chat_stream_shape_and_usage(client):
    """First chunk: delta.role; then content deltas; last choice chunk: finish_reason; with
    include_usage a usage chunk with no choices; the SDK's iterator ends on [DONE]."""
    stream = client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    body = [c for c in chunks if c.choices]
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 12


def test_logprobs_match_the_engine(client, tiny_llm, golden):
    ids = golden["tiny-llama"]["qv-r4"]["prompts"][2]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    expected = tiny_llm.generate({"prompt_token_ids": ids}, params, lora_request("qv-r4"), use_tqdm=False)[0]
    expected = expected.outputs[0]
    got = client.completions.create(model="qv-r4", prompt=ids, temperature=0, max_tokens=5, logprobs=3,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    for i, (token, top) in enumerate(zip(expected.token_ids, expected.logprobs)):
        assert math.isclose(got.token_logprobs[i], top[token], rel_tol=1e-5, abs_tol=1e-6)
        assert len(got.top_logprobs[i]) == 3
        assert max(got.top_logprobs[i].values()) == pytest.approx(got.token_logprobs[i])  # greedy: the best
    assert "".join(t for t in got.tokens if not t.startswith("bytes:")) == expected.text.replace("\ufffd", "")
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i] if not t.startswith("bytes:")) for i in range(5)]
    chat = client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "hi"}],
                                          logprobs=True, top_logprobs=2, **GREEDY).choices[0]
    content = chat.logprobs.content
    assert len(content) == 12
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == chat.message.content
    streamed = client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "hi"}],
                                              logprobs=True, top_logprobs=2, stream=True, **GREEDY)
    streamed = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]  # one per token
    for e in content:
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.token.startswith("bytes:") or bytes(e.bytes).decode("utf-8") == e.token


def test_n_and_several_prompts_and_seed(client):
    kwargs = dict(model="all-r8-rslora", temperature=1.0, max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    first = client.completions.create(prompt=["one two", "three four"], n=2, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in client.completions.create(prompt=["one two", "three four"], n=2, **kwargs).choices]
    assert len(set(texts)) > 1  # the n samples of a prompt differ (seed + j)
    assert first.usage.completion_tokens == 32
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "x"}], n=3, **kwargs)
    assert len(chat.choices) == 3 and chat.usage.completion_tokens == 24
    streamed = client.chat.completions.create(messages=[{"role": "user", "content": "x"}], n=3, stream=True, **kwargs)
    joined = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            joined[c.index] += c.delta.content or ""
    assert joined == [c.message.content for c in chat.choices]


def test_stop_string_and_echo(client, tiny_llm):
    full = client.completions.create(model="tiny", prompt="alpha beta", **GREEDY).choices[0].text
    stop = full[3:6]
    cut = client.completions.create(model="tiny", prompt="alpha beta", stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and cut.text == full[:full.index(stop)]
    echoed = client.completions.create(model="tiny", prompt="alpha beta", echo=True, **GREEDY).choices[0].text
    assert echoed == "alpha beta" + full


def test_async_sdk_streams_concurrently_for_two_tenants(served):
    async def one(client, model, tenant):
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hello {tenant}"}], stream=True,
            extra_headers={"x-tenant-id": tenant}, **GREEDY)
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hello {tenant}"}],
            extra_headers={"x-tenant-id": tenant}, **GREEDY)
        return text, reply.choices[0].message.content

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, ADAPTERS[i % 2], f"tenant-{i % 2}") for i in range(8)))

    for streamed, plain in asyncio.run(main()):
        assert streamed == plain and streamed
    with httpx.Client() as c:
        m = metrics(c, served.url)
    for tenant in ("tenant-0", "tenant-1"):
        assert value(m, "jaxserve:tenant_service_tokens_total", tenant=tenant, kind="generation") >= 8 * 12


def test_adapter_load_use_unload(client, http, tiny_llm):
    path = str(TINY / "adapters" / "regex-r16-pattern")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path})
    assert r.status_code == 200, r.text
    assert "late" in {m.id for m in client.models.list().data}
    got = client.completions.create(model="late", prompt="load me", **GREEDY).choices[0].text
    expected = tiny_llm.generate("load me", LLM_GREEDY, lora_request("regex-r16-pattern"), use_tqdm=False)
    assert got == expected[0].outputs[0].text
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="late", prompt="load me", **GREEDY)
    assert err.value.body["code"] == "model_not_found"
    missing = http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("make_bad", ["missing folder", "wrong shapes", "not an adapter"])
def test_a_bad_adapter_is_a_400_and_nothing_changes(client, http, tmp_path, make_bad):
    folder = tmp_path / "bad"
    if make_bad == "wrong shapes":  # an adapter of another model: config says rank 4, tensors differ
        folder.mkdir()
        src = TINY / "adapters" / "qv-r4"
        (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        from safetensors.numpy import load_file, save_file
        tensors = {k: v[..., :-1] for k, v in load_file(src / "adapter_model.safetensors").items()}
        save_file(tensors, folder / "adapter_model.safetensors")
    elif make_bad == "not an adapter":
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{not json")
    before = sorted(m.id for m in client.models.list().data)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(folder)})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "bad" in error["message"]
    assert sorted(m.id for m in client.models.list().data) == before
    assert client.completions.create(model="qv-r4", prompt="still fine", **GREEDY).choices[0].text


def _raw(body: str):
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


def _chat(**fields):
    return _raw(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}))


def _completion(**fields):
    return _raw(json.dumps({"model": "tiny", "prompt": "hi", **fields}))


BAD_INPUTS = {
    "malformed JSON": ("/v1/chat/completions", _raw('{"model": "tiny", "messages": ['), 400, None),
    "body not an object": ("/v1/completions", _raw("[1, 2]"), 400, None),
    "missing model": ("/v1/completions", _raw('{"prompt": "hi"}'), 400, "model"),
    "wrong type": ("/v1/completions", _completion(max_tokens="many"), 400, "max_tokens"),
    "messages not a list": ("/v1/chat/completions", _raw('{"model": "tiny", "messages": "hi"}'), 400, "messages"),
    "negative max_tokens": ("/v1/completions", _completion(max_tokens=-3), 400, "max_tokens"),
    "temperature NaN": ("/v1/chat/completions", _raw('{"model": "tiny", "messages": [{"role": "user", '
                                                     '"content": "hi"}], "temperature": NaN}'), 400, "temperature"),
    "top_p zero": ("/v1/completions", _completion(top_p=0), 400, "top_p"),
    "unknown model": ("/v1/completions", _raw('{"model": "nope", "prompt": "hi"}'), 404, "model"),
    "over-long prompt": ("/v1/completions", _completion(prompt="word " * 80), 400, "prompt"),
    "prompt + max_tokens over the context": ("/v1/completions", _completion(max_tokens=63), 400, "prompt"),
    "empty messages": ("/v1/chat/completions", _raw('{"model": "tiny", "messages": []}'), 400, "messages"),
    "empty prompt list": ("/v1/completions", _completion(prompt=[]), 400, "prompt"),
    "token id out of the vocabulary": ("/v1/completions", _completion(prompt=[1, 99999]), 400, "prompt"),
    "n zero": ("/v1/completions", _completion(n=0), 400, "n"),
    "unsupported penalty": ("/v1/chat/completions", _chat(presence_penalty=0.5), 400, "presence_penalty"),
    "logprobs too many": ("/v1/completions", _completion(logprobs=99), 400, "logprobs"),
    "image content": ("/v1/chat/completions", _raw('{"model": "tiny", "messages": [{"role": "user", "content": '
                                                   '[{"type": "image_url", "image_url": {"url": "x"}}]}]}'),
                      400, "messages"),
    "oversized body": ("/v1/completions", _completion(prompt="x" * (9 * 2**20)), 413, None),
    "unknown route": ("/v1/nothing", _raw("{}"), 404, None),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_in_openais_shape_and_the_server_goes_on(http, case):
    path, request, status, param = BAD_INPUTS[case]
    r = http.post(path, **request)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if case == "over-long prompt" or case.startswith("prompt + max_tokens"):
        assert error["code"] == "context_length_exceeded"
        assert error["message"].startswith("This model's maximum context length is 64 tokens. However, ")
    ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "fine", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 3, "some_client_extra": {"a": 1}, "metadata": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_health_version_and_metrics_names(http, served):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    http.post("/v1/completions", json={"model": "qv-r4", "prompt": "count me", "max_tokens": 4, "ignore_eos": True,
                                       "user": "metrics-tenant"})
    m = metrics(http, served.url)
    names = {name for name, _ in m}
    for required in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                     "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                     "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                     "vllm:e2e_request_latency_seconds_count", "vllm:lora_requests_info", "jaxserve:pool_pages",
                     "jaxserve:adapters", "jaxserve:adapter_loads_total", "jaxserve:adapter_evictions_total",
                     "jaxserve:tenant_service_total", "jaxserve:tenant_service_tokens_total",
                     "jaxserve:tenant_waiting_requests"):
        assert required in names, required
    assert value(m, "jaxserve:tenant_service_tokens_total", tenant="metrics-tenant", kind="generation") == 4
    prompt = value(m, "jaxserve:tenant_service_tokens_total", tenant="metrics-tenant", kind="prompt")
    assert value(m, "jaxserve:tenant_service_total", tenant="metrics-tenant") == prompt + 2 * 4
    pages = {k: value(m, "jaxserve:pool_pages", kind=k) for k in ("kv", "adapter", "free")}
    assert pages["kv"] == 0 and sum(pages.values()) == served.engine.pool.num_pages
    assert value(m, "jaxserve:adapters", state="registered") == len(served.engine.adapters.names())
    assert value(m, "jaxserve:adapter_loads_total") >= 1


def test_queue_limit_answers_429_with_retry_after():
    """One sequence at a time and at most 2 waiting: a burst of 8 gets some 429s (OpenAI's
    RateLimitError, with retry-after); the accepted ones all finish."""
    with Served(tiny_engine(max_num_seqs=1, max_num_batched_tokens=16), max_waiting_requests=2) as s:
        async def one(client, i):
            try:
                r = await client.post("/v1/completions", json={"model": "tiny", "prompt": f"p{i}", "max_tokens": 20,
                                                               "ignore_eos": True})
            except httpx.HTTPError as e:  # pragma: no cover - reported by the assertion below
                return repr(e)
            return r

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
                return await asyncio.gather(*(one(client, i) for i in range(8)))

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 20
        with pytest.raises(openai.RateLimitError):
            with openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0) as client:
                s.state.max_waiting_requests = 0  # (every request is now over the limit)
                client.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert not s.error_messages()

