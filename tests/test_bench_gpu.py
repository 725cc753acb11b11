"""`jaxserve bench gpu` (benchmarks/gpu.py, run by benchmarks/gpu.sh on a GPU machine): its plan,
its budget, and one real step end to end on the CPU with the tiny model (--smoke)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu  # noqa: E402

from jaxserve.cli import main  # noqa: E402


def test_the_gpu_plan_covers_the_kernels_and_s_loras_settings(tmp_path):
    plan = gpu.steps(gpu.build_parser().parse_args(["--out", str(tmp_path)]))
    names = [s["name"] for s in plan]
    assert names[:3] == ["kernels_correct", "kernels_bench", "compile_warm"]
    for test in gpu.KERNEL_TESTS:
        assert test in plan[0]["argv"] and (gpu.ROOT / test).exists()
    serve = {s["name"]: s["argv"] for s in plan[3:]}
    assert list(serve) == ["serve_s1_1000", "serve_s1_100", "serve_s1_1", "serve_s2_100", "serve_s4_100"]
    argv = serve["serve_s1_1000"]
    assert argv[argv.index("--compare") + 1] == "merged,padded" and argv[argv.index("--preset") + 1] == "s1"
    assert all(s["least"] <= s["limit"] for s in plan)


def test_a_step_that_does_not_fit_the_budget_is_skipped_and_fails_the_run(tmp_path, capsys):
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--budget", "5"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(s["status"].startswith("skipped: ") for s in summary["steps"].values())
    assert "kernels_bench" in summary["steps"] and summary["jax"]


def test_a_cpu_is_refused_without_smoke(tmp_path, capsys):
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    assert "jax's backend is 'cpu', not a GPU" in capsys.readouterr().out


def test_a_smoke_serve_step_writes_its_results_rows(tmp_path, monkeypatch):
    plan = gpu.steps
    monkeypatch.setattr(gpu, "steps", lambda args: [s for s in plan(args) if s["name"] == "serve_tiny_8"])
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serve_tiny_8.json").read_text())
    assert list(result["systems"]) == ["jaxserve", "merged", "padded"]
    rows = (tmp_path / "results.md").read_text().splitlines()
    assert rows[1].startswith("| preset | adapters | system |")
    done = result["systems"]["jaxserve"]["completed"]
    assert rows[3].startswith(f"| tiny | 8 | jaxserve | {done}/{result['num_requests']} |") and rows[3].endswith("1.00x |")
    assert [r.split(" | ")[2] for r in rows[3:]] == ["jaxserve", "merged", "padded"]
    assert (tmp_path / "serve_tiny_8.log").read_text().count("Serving Benchmark Result") == 3


@pytest.mark.parametrize("flag", ["--budget", "--rate"])
def test_bad_numbers_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        gpu.build_parser().parse_args([flag, "many"])
    assert f"argument {flag}: invalid float value: 'many'" in capsys.readouterr().err


def test_decode_layer_is_judged_against_weights_plus_kv_at_copy_bandwidth():
    import kernels
    base = {"impl": "base layer (7 matmuls, no attention)", "ms": 0.6, "batch": 64, "base_weight_bytes": 1.5e9}
    att = [{"impl": "jaxserve pps=8", "ms": 0.9, "context": 2048, "heads": 32, "kv_heads": 32, "kv_bytes": 0.5e9},
           {"impl": "jaxserve pps=16", "ms": 0.7, "context": 2048, "heads": 32, "kv_heads": 32, "kv_bytes": 0.5e9},
           {"impl": "xla reference", "ms": 0.1, "context": 2048, "heads": 32, "kv_heads": 32, "kv_bytes": 0.5e9},
           {"impl": "jaxserve pps=8", "ms": 0.1, "context": 2048, "heads": 32, "kv_heads": 8, "kv_bytes": 0.1e9}]
    # floor: (1.5 + 0.5) GB at 2 TB/s = 1.0 ms; step: 0.6 + the fastest jaxserve MHA split 0.7 = 1.3 ms
    (line,) = kernels.decode_step_vs_floor(att, [base], copy_tbs=2.0, heads=32)
    assert "= 1.300 ms vs floor 1.000 ms" in line and "1.30x" in line and line.endswith("MET")
    (line,) = kernels.decode_step_vs_floor(att, [{**base, "ms": 0.7}], copy_tbs=2.0, heads=32)
    assert "1.40x" in line and line.endswith("NOT MET")
    assert kernels.decode_step_vs_floor(att, [base], copy_tbs=None, heads=32) == []
