"""Fair scheduling in the real engine (tiny model, CPU): a short overload of two clients — one
sending twice the other's rate — replayed on a virtual clock (deterministic), under VTC and FCFS.
VTC keeps the backlogged service difference within the theorem's 2U and far below FCFS's, at the
same throughput; the `jaxserve fairness` command writes its summary and plots."""
import json

import pytest

from conftest import TINY

from jaxserve.cli import main
from jaxserve.engine import Engine
from jaxserve.memory.pool import KV
from jaxserve.fairness import metrics
from jaxserve.sched import make_scheduler
from jaxserve.fairness.replay import replay
from jaxserve.fairness.workloads import Request


def overload(duration=8.0, rates=(4.0, 8.0), input_len=12, output_len=10):
    reqs = []
    for c, rate in enumerate(rates):
        n = int(duration * rate)
        reqs += [Request(f"client{c}", (i + 0.5 * c / len(rates)) / rate, input_len, output_len) for i in range(n)]
    return sorted(reqs, key=lambda r: r.arrival)


def run(name, workload, **options):
    engine = Engine(model=str(TINY), max_model_len=32, max_num_seqs=4, max_num_batched_tokens=32,
                    scheduler=make_scheduler(name, **options), seed=0)
    result = replay(engine, workload, step_seconds=0.05)
    assert not engine.has_unfinished_requests() and engine.pool.num_used(KV) == 0
    return result


@pytest.fixture(scope="module")
def results():
    workload = overload()
    return {name: run(name, workload) for name in ("vtc", "fcfs")}


def test_vtc_bounded_and_far_below_fcfs_at_equal_throughput(results):
    vtc, fcfs = results["vtc"], results["fcfs"]
    assert all(r.finish is not None and r.output_len == 10 for res in results.values() for r in res.requests)
    bound = metrics.vtc_bound(1, 2, 12, vtc.config.kv_capacity)  # M = 4 sequences x 32 tokens
    d_vtc, d_fcfs = (metrics.backlogged_difference(r) for r in (vtc, fcfs))
    print(f"VTC max/avg {d_vtc['max']:.0f}/{d_vtc['avg']:.0f}, FCFS {d_fcfs['max']:.0f}/{d_fcfs['avg']:.0f}, "
          f"2U {bound:.0f}; throughput {vtc.throughput():.1f} vs {fcfs.throughput():.1f}")
    assert d_vtc["backlogged_time"] > 5 and d_fcfs["backlogged_time"] > 5  # both really were overloaded
    assert d_vtc["max"] <= bound
    assert d_fcfs["max"] > 3 * d_vtc["max"] and d_fcfs["avg"] > 5 * d_vtc["avg"]
    assert abs(vtc.throughput() / fcfs.throughput() - 1) <= 0.05


def test_fairness_command_on_the_engine(tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(json.dumps(r.to_json()) for r in overload(duration=2.0)))
    assert main(["fairness", "--workload", str(workload), "--scheduler", "vtc,fcfs", "--model", "tiny",
                 "--max-model-len", "32", "--max-num-seqs", "4", "--step-seconds", "0.05",
                 "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["schedulers"]) == {"vtc", "fcfs"}
    for s in summary["schedulers"].values():
        assert s["finished"] == s["requests"] == 24
        assert set(s["service_per_client"]) == {"client0", "client1"}
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0


def test_fairness_command_in_the_simulator(tmp_path, capsys):
    assert main(["fairness", "--suite", "overload", "--duration", "60", "--scheduler", "vtc,fcfs", "--simulate",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["schedulers"]
    assert summary["vtc"]["max_backlogged_difference"] <= summary["vtc"]["bound_2U"]
    assert summary["fcfs"]["avg_backlogged_difference"] > 10 * summary["vtc"]["avg_backlogged_difference"]
    assert "vtc" in capsys.readouterr().out


def test_bad_weights_are_a_clear_error(tmp_path, capsys):
    assert main(["fairness", "--suite", "overload", "--simulate", "--weights", "a=0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxserve fairness: error: --weights item 'a=0' is invalid") and "Traceback" not in err


def test_cost_model_fitted_from_the_engine_drives_the_simulator(tmp_path):
    """A wall-clock engine run fits the step-cost model (least squares with an intercept: its
    predictions add up to the measured time); the simulator then runs on it."""
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(json.dumps(r.to_json()) for r in overload(duration=1.5, rates=(6.0, 12.0))))
    cost = tmp_path / "cost.json"
    common = ["fairness", "--workload", str(workload), "--scheduler", "vtc", "--max-model-len", "32",
              "--max-num-seqs", "4"]
    assert main(common + ["--model", "tiny", "--speedup", "4", "--fit-cost-model", str(cost),
                          "--out", str(tmp_path / "engine")]) == 0
    from jaxserve.fairness.sim import CostModel
    fitted = CostModel(**json.loads(cost.read_text()))
    summary = json.loads((tmp_path / "engine" / "summary.json").read_text())
    assert summary["fitted_cost_model"] == json.loads(cost.read_text())
    assert main(common + ["--simulate", "--cost-model", str(cost), "--out", str(tmp_path / "sim")]) == 0
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())["schedulers"]["vtc"]
    assert sim["finished"] == sim["requests"] == 27
    assert fitted != CostModel()


def test_fitted_cost_model_reproduces_the_measured_time():
    from jaxserve.fairness.run import fit_cost_model
    engine = Engine(model=str(TINY), max_model_len=32, max_num_seqs=4, max_num_batched_tokens=32,
                    scheduler=make_scheduler("vtc"), seed=0)
    result = replay(engine, overload(duration=1.0, rates=(6.0, 12.0)), speedup=4.0)
    steps = [st for st in result.steps if st.steps == 1]
    model = fit_cost_model([result])
    predicted = sum(model.step_time(st.prefill, st.decode, st.batch) for st in steps)
    assert predicted == pytest.approx(sum(st.duration for st in steps), rel=1e-6)


def test_rpm_in_the_engine_delays_or_rejects_over_the_limit():
    from jaxserve import SamplingParams
    from jaxserve.sched import RPMScheduler
    now = [0.0]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    delay = Engine(model=str(TINY), max_model_len=32, max_num_seqs=4, scheduler=RPMScheduler(rpm=1, clock=lambda: now[0]))
    for i in range(2):
        delay.add_request(f"d{i}", {"prompt_token_ids": [5, 6, 7]}, params, client="a")
    delay.add_request("other", {"prompt_token_ids": [5, 6, 7]}, params, client="b")
    finished = {}
    for _ in range(50):
        finished.update({o.request_id: o for o in delay.step() if o.finished})
    assert set(finished) == {"d0", "other"} and delay.has_unfinished_requests()  # d1 waits out the minute
    now[0] = 61.0
    while delay.has_unfinished_requests():
        finished.update({o.request_id: o for o in delay.step() if o.finished})
    assert finished["d1"].outputs[0].finish_reason == "length"
    reject = Engine(model=str(TINY), max_model_len=32, max_num_seqs=4, scheduler="rpm",
                    scheduler_options={"rpm": 2, "reject": True})
    for i in range(3):
        reject.add_request(f"r{i}", {"prompt_token_ids": [5, 6, 7]}, params, client="a")
    outs = {}
    while reject.has_unfinished_requests():
        outs.update({o.request_id: o for o in reject.step() if o.finished})
    assert [outs[f"r{i}"].outputs[0].finish_reason for i in range(3)] == ["length", "length", "abort"]
    assert "rejected by the rpm scheduler" in outs["r2"].outputs[0].stop_reason
    assert reject.pool.num_used(KV) == 0


def test_replay_serves_each_clients_adapter(tmp_path):
    """Workload requests name adapters: --demo-adapters serves each client through its own PEFT
    adapter, loaded into the unified pool on demand."""
    from jaxserve.fairness.run import demo_adapters
    workload = [Request(r.client, r.arrival, r.input_len, r.output_len, adapter=f"lora-{r.client}")
                for r in overload(duration=1.0)]
    engine = Engine(model=str(TINY), max_model_len=32, max_num_seqs=4, max_num_batched_tokens=32,
                    scheduler=make_scheduler("vtc"), seed=0)
    adapters = demo_adapters(engine, workload, tmp_path)
    assert sorted(adapters) == ["lora-client0", "lora-client1"]
    result = replay(engine, workload, step_seconds=0.05, adapters=adapters)
    assert all(r.finish is not None and r.output_len == 10 for r in result.requests)
    assert engine.adapters.metrics()["adapter_loads"] >= 2 and set(engine.list_loras()) == set(adapters)
    assert engine.pool.num_used(KV) == 0
