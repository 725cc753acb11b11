"""`jaxserve bench serve`: S-LoRA's synthetic trace (its distributions, checked statistically with
fixed seeds) and the CLI's printed block and JSON on the tiny model."""
import json

import numpy as np
import pytest

from jaxserve.cli import main
from jaxserve.fairness.workloads import slora_trace

VLLM_LINES = ("Successful requests:", "Benchmark duration (s):", "Total input tokens:", "Total generated tokens:",
              "Request throughput (req/s):", "Output token throughput (tok/s):", "Total Token throughput (tok/s):",
              "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):", "Mean TPOT (ms):", "Median TPOT (ms):",
              "P99 TPOT (ms):", "Mean ITL (ms):", "Median ITL (ms):", "P99 ITL (ms):", "Mean E2EL (ms):",
              "Median E2EL (ms):", "P99 E2EL (ms):")


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_adapter_popularity_follows_power_alpha(alpha):
    """P(adapter index < k) = (k / N) ** alpha: the empirical CDF within 0.02 everywhere (the
    Kolmogorov-Smirnov statistic of 20,000 draws is ~0.01 at the 99th percentile)."""
    n = 50
    trace = slora_trace(n, alpha, 1000.0, 1.0, 20.0, (8, 16), (8, 16), seed=1)
    index = np.array([int(r.adapter[4:]) for r in trace])
    assert len(trace) == 20000 and index.min() >= 0 and index.max() < n
    for k in range(1, n):
        assert abs((index < k).mean() - (k / n) ** alpha) < 0.02, k


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_arrivals_are_gamma_with_the_rate_and_cv(cv):
    rate = 40.0
    trace = slora_trace(10, 1.0, rate, cv, 500.0, (8, 16), (8, 16), seed=2)
    gaps = np.diff([0.0] + [r.arrival for r in trace])
    assert len(trace) == 20000 and (gaps >= 0).all()  # (cv 2: some gaps are below float resolution)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    if cv == 1.0:  # Poisson: the count in each second is Poisson(rate) — variance = mean
        counts = np.bincount(np.array([r.arrival for r in trace]).astype(int))[:-1]
        assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.15)


def test_lengths_uniform_in_their_ranges_and_tenants_own_adapters():
    trace = slora_trace(12, 0.5, 100.0, 1.0, 200.0, (8, 512), (4, 64), tenants=4, seed=3)
    inputs = np.array([r.input_len for r in trace])
    outputs = np.array([r.output_len for r in trace])
    assert (inputs.min(), inputs.max()) == (8, 511) and (outputs.min(), outputs.max()) == (4, 63)
    assert inputs.mean() == pytest.approx((8 + 511) / 2, rel=0.02)
    assert outputs.mean() == pytest.approx((4 + 63) / 2, rel=0.02)
    hist = np.bincount(outputs - 4, minlength=60) / len(outputs)  # every length about equally likely
    assert np.abs(hist - 1 / 60).max() < 0.006
    for r in trace:
        assert r.client == f"client{int(r.adapter[4:]) % 4}"
    assert trace == slora_trace(12, 0.5, 100.0, 1.0, 200.0, (8, 512), (4, 64), tenants=4, seed=3)  # seeded


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_adapters=0), "num_adapters=0 is invalid"),
    (dict(alpha=-1.0), "alpha=-1.0 is invalid"),
    (dict(cv=float("nan")), "cv=nan is invalid"),
    (dict(input_range=(10, 10)), "input_range=(10, 10) is invalid"),
])
def test_bad_trace_parameters_are_clear_errors(kwargs, message):
    base = dict(num_adapters=4, alpha=1.0, request_rate=1.0, cv=1.0, duration=10.0, input_range=(8, 16),
                output_range=(8, 16))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slora_trace(**{**base, **kwargs})


def test_bench_serve_prints_vllms_block_and_writes_json(tmp_path, capsys):
    path = tmp_path / "result.json"
    assert main(["bench", "serve", "--preset", "tiny", "--num-adapters", "8", "--alpha", "0.5", "--request-rate",
                 "10", "--duration", "2", "--tenants", "2", "--scheduler", "vtc", "--save-result", str(path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    for label in VLLM_LINES + ("SLO attainment (TTFT <= 6 s):", "Adapters used / loads / evictions:"):
        assert label in out, label
    result = json.loads(path.read_text())
    trace = slora_trace(8, 0.5, 10.0, 1.0, 2.0, (4, 24), (4, 24), tenants=2, seed=42)
    assert result["num_requests"] == len(trace) == result["completed"] and result["failed"] == 0
    assert result["total_output_tokens"] == sum(r.output_len for r in trace)  # every token, none extra
    assert result["total_input_tokens"] == sum(r.input_len for r in trace)
    assert result["adapters_used"] == len({r.adapter for r in trace}) == result["adapter_loads"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < result[key]["median"] <= result[key]["p99"]
    assert result["ttft_ms"]["mean"] <= result["e2el_ms"]["mean"]
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / result["duration"])
    assert result["config"]["scheduler"] == "vtc" and result["peak_pages"]["adapter"] > 0
    assert f"Successful requests:                     {len(trace)}" in out


def test_bench_serve_refuses_a_bad_range(capsys):
    assert main(["bench", "serve", "--preset", "tiny", "--input-len", "9:3"]) == 2
    assert "'9:3' is invalid; allowed: LO:HI with 1 <= LO < HI" in capsys.readouterr().err


def test_bench_serve_compares_the_baselines_on_the_same_trace(tmp_path, capsys, monkeypatch):
    """Every baseline serves the same trace to the same tokens (greedy); only memory differs: with
    max_loras 3, padded slots hold 3 adapters (so the trace's others evict them) while the same
    region holds every adapter at its own rank; merged switches once per adapter at least."""
    monkeypatch.delenv("JAXSERVE_HF_PYTHON", raising=False)
    path = tmp_path / "result.json"
    assert main(["bench", "serve", "--preset", "tiny", "--num-adapters", "8", "--request-rate", "12", "--duration",
                 "2", "--max-loras", "3", "--compare", "padded,separate-memory,merged,hf-peft", "--save-result",
                 str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "hf-peft SKIPPED: no --hf-python (or JAXSERVE_HF_PYTHON) given" in out
    systems = json.loads(path.read_text())["systems"]
    assert list(systems) == ["jaxserve", "padded", "separate-memory", "merged"]
    trace = slora_trace(8, 1.0, 12.0, 1.0, 2.0, (4, 24), (4, 24), seed=42)
    used = len({r.adapter for r in trace})
    for name, r in systems.items():
        assert r["completed"] == len(trace) and r["same_tokens"] == 1.0, name
        assert r["total_output_tokens"] == sum(t.output_len for t in trace), name
    padded, separate = systems["padded"], systems["separate-memory"]
    assert padded["adapter_region_pages"] == separate["adapter_region_pages"] == 3 * padded["slot_pages"]
    assert padded["peak_pages"]["adapter"] % padded["slot_pages"] == 0
    assert padded["adapter_evictions"] >= used - 3 > 0
    if used * systems["jaxserve"]["mean_adapter_pages"] <= separate["adapter_region_pages"]:
        assert separate["adapter_evictions"] == 0 and separate["adapter_loads"] == used
    assert systems["merged"]["adapter_loads"] == 0 and systems["merged"]["merges"] >= used
    region, slot = padded["adapter_region_pages"], padded["slot_pages"]
    assert f"Adapter capacity in {region} pages: paged" in out and f"vs padded slots 3 ({slot} pages each)" in out
    for name in systems:
        assert any(line.startswith(f"{name} ") and line.endswith("x") for line in out.splitlines()), name


def test_bench_serve_refuses_an_unknown_baseline(capsys):
    assert main(["bench", "serve", "--preset", "tiny", "--compare", "padded,vllm"]) == 2
    assert "'padded,vllm' is invalid; allowed: distinct names among padded, separate-memory, merged, hf-peft" in \
        capsys.readouterr().err
