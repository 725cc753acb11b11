"""The fairness simulator: cost model, memory model, engine-like charging, fused steps, speed."""
import time
from pathlib import Path
from collections import defaultdict

import pytest

from jaxserve.sched import make_scheduler
from jaxserve.fairness import metrics as M
from jaxserve.fairness import workloads as W
from jaxserve.fairness.sim import CostModel, simulate
from jaxserve.fairness.workloads import Request

REAL = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "vtc_real_trace.jsonl")


def real_trace():
    import os
    path = os.environ.get("VTC_REAL_TRACE", REAL)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return W.load(path)


def test_cost_fit_recovers_coefficients():
    true = CostModel(0.01, 0.0002, 0.0007, 0.0001)
    samples = [(p, d, bt, true.step_time(p, d, bt)) for p in (0, 100, 700) for d in (1, 20, 64)
               for bt in (d, d + 3)]
    got = CostModel.fit(samples)
    for x, y in zip((got.a, got.b, got.c, got.d), (true.a, true.b, true.c, true.d)):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9)
    got3 = CostModel.fit([(p, d, s) for p, d, _, s in samples if _ == d])
    assert got3.d == 0 and got3.c == pytest.approx(true.c + true.d)


def test_jsonl_roundtrip(tmp_path):
    wl = W.overload_weighted(duration=10)
    W.save(wl, tmp_path / "w.jsonl")
    back = W.load(tmp_path / "w.jsonl")
    assert [(r.client, r.input_len, r.output_len, r.weight) for r in back] == \
           [(r.client, r.input_len, r.output_len, r.weight) for r in wl]
    assert W.weights_of(back) == {"client0": 1, "client1": 2, "client2": 3, "client3": 4}
    (tmp_path / "bad.jsonl").write_text('{"client": "a", "arrival": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        W.load(tmp_path / "bad.jsonl")


def test_generators_seeded_and_shaped():
    for name in W.SUITES:
        a, b = W.generate(name, duration=120), W.generate(name, duration=120)
        assert a == b and a, name
        assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
    ov = W.overload()
    n = defaultdict(int)
    for r in ov:
        n[r.client] += 1
    assert n == {"client0": 540, "client1": 1080} and ov[-1].arrival <= 361
    psl = W.poisson_short_long()
    assert {(r.client, r.input_len, r.output_len) for r in psl} == {("client0", 64, 64), ("client1", 256, 256)}
    oo = [r for r in W.on_off_overload() if r.client == "client0"]
    assert all(int(r.arrival // 60) % 2 == 0 for r in oo)


def test_every_token_charged_once_with_preemptions():
    """Under a tight KV cache (many preemptions), each scheduler's counters equal the service
    in the step records, which equals w_p * input + w_q * output of every request."""
    wl = W.overload(duration=40)
    for name in ("vtc", "lcf", "vtc-predict"):
        sch = make_scheduler(name)
        r = simulate(wl, sch, kv_capacity=2000)
        assert r.num_preemptions > 20
        assert all(q.finish is not None and q.output_len == 256 for q in r.requests)
        truth = defaultdict(float)
        for q in r.requests:
            truth[q.client] += q.input_len + 2 * q.output_len
        svc = M.service_by_client(r)
        for c in truth:
            assert svc[c] == pytest.approx(truth[c])
            assert sch.counters[c] - sch.lifted[c] == pytest.approx(truth[c])
    assert sum(sch.lifted.values()) > 0 and sum(make_scheduler("lcf").lifted.values()) == 0


def test_memory_and_batch_limits_and_chunking():
    wl = [Request("a", 0.0, 3000, 4), Request("b", 0.0, 50, 30), Request("a", 0.1, 10, 3)]
    r = simulate(wl, make_scheduler("fcfs"), kv_capacity=4000, max_num_batched_tokens=1024, max_num_seqs=2)
    assert all(st.prefill + st.decode <= 1024 and st.batch <= 2 for st in r.steps)
    first = r.steps[0]
    assert first.prefill == 1024 and first.decode == 0       # the long prompt is chunked
    by = {q.request_id: q for q in r.requests}
    assert by["0"].first_token > by["0"].arrival and by["1"].first_token is not None
    assert by["2"].first_token >= by["0"].finish or by["2"].first_token >= by["1"].finish  # 2 seqs max
    with pytest.raises(ValueError, match="never fit"):
        simulate([Request("a", 0, 5000, 5)], make_scheduler("fcfs"), kv_capacity=4000)


def test_fused_steps_are_exact():
    wl = real_trace()[:250]
    for name in ("vtc", "fcfs"):
        a = simulate(wl, make_scheduler(name), fuse=True)
        b = simulate(wl, make_scheduler(name), fuse=False)
        assert len(a.steps) < len(b.steps)
        assert sum(s.steps for s in a.steps) == sum(s.steps for s in b.steps)
        for x, y in zip(a.requests, b.requests):
            assert x.first_token == pytest.approx(y.first_token, abs=1e-6)
            assert x.finish == pytest.approx(y.finish, abs=1e-6)
            assert x.num_preemptions == y.num_preemptions


def test_work_conserving():
    """No step idles while a waiting request fits (all but RPM, which holds requests back)."""
    for suite in ("on_off_less", "increase", "proportional"):
        wl = W.generate(suite, duration=180)
        for name in ("vtc", "fcfs", "lcf", "vtc-predict"):
            r = simulate(wl, make_scheduler(name))
            assert r.idle_with_fit == 0, (suite, name)
    r = simulate(W.overload(duration=60), make_scheduler("rpm", rpm=5))
    assert r.idle_with_fit > 0


def test_until_stops_the_clock():
    r = simulate(W.overload(), make_scheduler("vtc"), until=100)
    assert r.end_time == pytest.approx(100, abs=1)
    assert any(q.finish is None for q in r.requests)


def test_ten_minute_trace_in_seconds():
    wl = real_trace()
    t = time.perf_counter()
    r = simulate(wl, make_scheduler("vtc"))
    assert time.perf_counter() - t < 10
    assert len(r.requests) == 1500 and all(q.finish is not None for q in r.requests)


def test_rpm_in_simulator_respects_limit():
    r = simulate(W.overload(duration=120), make_scheduler("rpm", rpm=10))
    starts = defaultdict(list)
    # the first admission is no later than the first token; count first tokens per 60 s window
    for q in r.requests:
        if q.first_token is not None:
            starts[q.client].append(q.first_token)
    for c, ts in starts.items():
        ts.sort()
        for i in range(len(ts) - 10):
            assert ts[i + 10] - ts[i] > 60 - 5, c  # (first token comes a step or so after admission)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from jaxserve.fairness.plots import plot_compare, plot_run
    wl = W.on_off_less(duration=120)
    rs = [simulate(wl, make_scheduler(n)) for n in ("vtc", "fcfs")]
    p = plot_run(rs[0], tmp_path / "run.png")
    q = plot_compare(rs, tmp_path / "cmp.png", title="on_off_less")
    assert p.stat().st_size > 1000 and q.stat().st_size > 1000


@pytest.mark.parametrize("overrides,match", [({"kv_capacity": 0}, "kv_capacity=0"),
                                             ({"max_num_seqs": 2.5}, "max_num_seqs=2.5"),
                                             ({"until": float("nan")}, "until=nan"),
                                             ({"cost": 3}, "cost=3")])
def test_simulator_config_is_checked(overrides, match):
    with pytest.raises(ValueError, match=f"SimConfig.{match} is invalid"):
        simulate(W.overload(duration=10), make_scheduler("vtc"), **overrides)
