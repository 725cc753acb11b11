"""`jaxserve serve` as a user runs it (a subprocess): it logs its URL when ready, serves the
adapters given, and on SIGTERM lets an in-flight stream finish and exits 0. Shutdown past its
grace period aborts what is left — the client is told (finish_reason "abort") — and frees every
page (in-process: the same server class)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import TINY
from served import Served
from test_server import tiny_engine

from jaxserve.cli import main
from jaxserve.memory.pool import KV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_stream(url: str, body: dict, headers: dict, out: dict) -> None:
    """Read a streamed completion into out: events, text, finish, usage; cut=True if the
    server closed the connection mid-stream."""
    out.update(text="", events=[])
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    _take_event(line, out)
    except httpx.RemoteProtocolError:
        out["cut"] = True


def _take_event(line: str, out: dict) -> None:
    out["events"].append(line)
    out["first"].set()
    event = None if line == "data: [DONE]" else json.loads(line[6:])
    if event and event["choices"]:
        out["text"] += event["choices"][0]["text"]
        out["finish"] = event["choices"][0]["finish_reason"]
    elif event:
        out["usage"] = event["usage"]


def test_serve_logs_its_url_serves_and_stops_gracefully_on_sigterm():
    port = _free_port()
    env = {**os.environ, "JAXSERVE_WARMUP": "0", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--model", str(TINY), "--max-model-len", "64",
           "--port", str(port), "--lora", f"qv={TINY / 'adapters' / 'qv-r4'}", "--api-key", "k",
           "--scheduler", "vtc", "--tenant-weight", "gold=2", "--shutdown-timeout", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    try:
        deadline = time.monotonic() + 180
        url = f"http://127.0.0.1:{port}"
        while not any(f"running on {url}" in line for line in log):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(log)
            log.append(line)
            assert time.monotonic() < deadline, "".join(log)
        threading.Thread(target=lambda: [log.append(line) for line in proc.stdout], daemon=True).start()
        headers = {"Authorization": "Bearer k", "x-tenant-id": "gold"}
        models = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models] == [str(TINY), "qv"]
        out = {"first": threading.Event()}
        body = {"model": "qv", "prompt": [1], "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        reader = threading.Thread(target=_read_stream, args=(url, body, headers, out))
        reader.start()
        assert out["first"].wait(60)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert proc.wait(120) == 0, "".join(log)
        # the stream in flight at SIGTERM was finished: all 60 tokens, then [DONE]
        assert out["events"][-1] == "data: [DONE]" and out["finish"] == "length"
        assert out["usage"]["completion_tokens"] == 60
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(log)


def test_serve_refuses_bad_flags_with_a_clear_error(capsys):
    assert main(["serve", "--model", str(TINY), "--tenant-weight", "gold"]) == 2
    assert "--tenant-weight 'gold' is invalid; allowed: NAME=VALUE" in capsys.readouterr().err
    assert main(["serve", "--model", str(TINY), "--scheduler", "fcfs", "--tenant-weight", "a=2"]) == 2
    assert "scheduler='fcfs'" in capsys.readouterr().err


def test_shutdown_past_its_timeout_aborts_what_is_left_and_frees_every_page():
    engine = tiny_engine()
    step = engine.step

    def slow_step(*args, **kwargs):  # ~60 tokens at 20/s: longer than the 0.5 s grace period
        time.sleep(0.05)
        return step(*args, **kwargs)

    engine.step = slow_step
    served = Served(engine, grace=0.5)
    out = {"first": threading.Event()}
    with served:
        body = {"model": "qv-r4", "prompt": [1], "max_tokens": 60, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        reader = threading.Thread(target=_read_stream, args=(served.url, body, {}, out), daemon=True)
        reader.start()
        assert out["first"].wait(60)
        start = time.monotonic()
    assert time.monotonic() - start < 10
    reader.join(30)
    # cut short: aborted, and told so — finish_reason "abort", the usage so far, [DONE]
    assert out["finish"] == "abort" and out["usage"]["completion_tokens"] < 60
    assert out["events"][-1] == "data: [DONE]" and not out.get("cut")
    assert not served.error_messages()
    assert not engine.has_unfinished_requests() and engine.pool.num_used(KV) == 0
    assert engine.adapters.metrics()["adapters_pinned"] == 0
