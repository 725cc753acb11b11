"""`jaxserve demo` (the main job) on the tiny model: real answers (two through adapters), then
one workload of 4 tenants over generated adapters under FCFS and VTC, tables, plot and JSON."""
import json

from conftest import TINY

from jaxserve.cli import main

SMALL = ["--model", str(TINY), "--max-model-len", "64", "--max-tokens", "6", "--adapters", "8"]


def test_demo_answers_then_compares_fcfs_and_vtc(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *SMALL, "--duration", "3", "--rates", "2,2,4,8", "--input-len", "4:16",
                 "--output-len", "4:12", "--drain", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("[base model] What is the capital of France?", "[demo-a] Name three primary colors.",
                  "[demo-b] Why is the sky blue?", "4 requests in one batch", "workload:", "TTFT mean", "TPOT P99",
                  "max diff", "client3", "fcfs service", "vtc TTFT", "plots:", "result:"):
        assert label in printed, label
    result = json.loads((out / "demo.json").read_text())
    rows = {r["scheduler"]: r for r in result["schedulers"]}
    assert set(rows) == {"fcfs", "vtc"}
    for r in rows.values():
        assert r["requests"] == result["requests"] > 20 and r["finished"] == r["requests"]
        assert set(r["service_per_tenant"]) == {"client0", "client1", "client2", "client3"}
        assert r["ttft_s"]["mean"] <= r["ttft_s"]["p99"] and r["tokens_per_s"] > 0
    assert (out / "fcfs_vs_vtc.png").stat().st_size > 10_000


def test_demo_quick_is_one_batch_only(tmp_path, capsys):
    assert main(["demo", *SMALL, "--quick", "--out", str(tmp_path / "q")]) == 0
    printed = capsys.readouterr().out
    assert "4 requests in one batch" in printed and "workload:" not in printed
    assert not (tmp_path / "q").exists()


def test_demo_refuses_bad_rates(capsys):
    assert main(["demo", *SMALL, "--rates", "1,2"]) == 2
    assert "--rates '1,2' is invalid; allowed: 4 numbers > 0" in capsys.readouterr().err


def test_demo_refuses_an_unknown_scheduler(capsys):
    assert main(["demo", *SMALL, "--schedulers", "fcfs,nope"]) == 2
    assert "'nope' is invalid" in capsys.readouterr().err
