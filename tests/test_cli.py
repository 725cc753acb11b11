"""`jaxserve generate` over the Python API."""
import json

import pytest
from conftest import TINY

from jaxserve import LLM, SamplingParams
from jaxserve.cli import main


def test_generate_prints_text_and_throughput(capsys):
    assert main(["generate", "--model", str(TINY), "--max-model-len", "64", "--max-tokens", "6",
                 "Hello world", "The year"]) == 0
    out = capsys.readouterr().out
    expected = LLM(str(TINY), max_model_len=64).generate(["Hello world"], SamplingParams(temperature=0, max_tokens=6))
    assert f"--- 'Hello world'\n{expected[0].outputs[0].text}\n" in out
    assert "tokens/s" in out


def test_generate_with_lora_and_chat(capsys):
    adapter = TINY / "adapters" / "qv-r4"
    assert main(["generate", "--model", str(TINY), "--max-model-len", "64", "--max-tokens", "4", "--chat",
                 "--lora", f"qv={adapter}", "Hi"]) == 0
    from jaxserve import LoRARequest
    expected = LLM(str(TINY), max_model_len=64).chat(
        [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4),
        LoRARequest("qv", 1, str(adapter)))[0]
    assert f"--- {expected.prompt!r}\n{expected.outputs[0].text}\n" in capsys.readouterr().out


def test_engine_flags_are_engine_config_with_its_defaults():
    """The CLI's engine knobs are EngineConfig's fields: same defaults, so they cannot drift
    (the demo alone sets its batch shapes and adapter rank, on purpose)."""
    import dataclasses

    from jaxserve.cli import ENGINE_FLAGS, build_parser
    from jaxserve.config import EngineConfig
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    gen = vars(build_parser().parse_args(["generate", "x"]))
    assert {name: gen[name] for name in ENGINE_FLAGS} == {name: defaults[name] for name in ENGINE_FLAGS}
    assert gen["model"] == defaults["model"]
    demo = vars(build_parser().parse_args(["demo"]))
    assert {n for n in ENGINE_FLAGS if demo[n] != defaults[n]} == {"max_model_len", "max_num_seqs",
                                                                     "max_num_batched_tokens", "max_lora_rank"}
    assert vars(build_parser().parse_args(["generate", "--max-num-seqs", "4", "x"]))["max_num_seqs"] == 4


def test_generate_on_a_small_model_needs_no_max_model_len(capsys):
    """The default max_model_len is the engine's (the model's limit), not a number the tiny
    model cannot hold."""
    assert main(["generate", "--model", str(TINY), "--max-tokens", "2", "Hello"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_bad_input_is_one_clear_line_and_exit_2(capsys):
    for flags, name in ((["--temperature", "-1"], "temperature"), (["--max-num-seqs", "0"], "max_num_seqs"),
                        (["--model", "/no/such/model"], "/no/such/model")):
        assert main(["generate", "--model", str(TINY), *flags, "--max-tokens", "2", "Hello"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxserve generate: error: ") and name in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


GOOD_LINE = '{"client": "a", "arrival": 0.5, "input_len": 8, "output_len": 4}'


@pytest.mark.parametrize("lines,flags,message", [
    (['{"client": "a", "arrival": NaN, "input_len": 8, "output_len": 4}'], [], "arrival=nan is invalid"),
    (['{"client": "a", "arrival": Infinity, "input_len": 8, "output_len": 4}'], [], "arrival=inf is invalid"),
    (['{"client": "a", "arrival": 1, "input_len": 8.5, "output_len": 4}'], [], "input_len=8.5 is invalid; allowed: an integer >= 1"),
    (['{"client": null, "arrival": 1, "input_len": 8, "output_len": 4}'], [], "client=None is invalid"),
    (['{"client": "a", "arrival": 1, "input_len": 8, "output_len": 4, "weight": 0}'], [], "weight=0 is invalid"),
    (['[1, 2]'], [], "not a JSON object"),
    ([], [], "the workload has no requests"),
    ([GOOD_LINE], ["--duration", "0.1"], "no requests in the first 0.1 s"),
    ([GOOD_LINE], ["--duration", "-1"], "--duration -1.0 is invalid; allowed: a number > 0"),
    ([GOOD_LINE], ["--rpm", "0", "--scheduler", "rpm"], "--rpm 0 is invalid"),
    ([GOOD_LINE], ["--scheduler", "vtc,nope"], "--scheduler 'nope' is invalid; allowed: a comma-separated list of fcfs"),
    ([GOOD_LINE], ["--kv-capacity", "0"], "--kv-capacity 0 is invalid"),
])
def test_fairness_bad_input_is_one_clear_line_and_nothing_runs(tmp_path, capsys, lines, flags, message):
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(lines))
    out = tmp_path / "out"
    assert main(["fairness", "--workload", str(workload), "--simulate", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxserve fairness: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "summary.json").exists()  # (a bad scheduler name is found before the first run)


def test_fairness_rpm_limit_is_the_one_given(tmp_path):
    """--rpm 1 admits one request per client per minute: of 5 requests in 10 s, 1 runs at once."""
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(f'{{"client": "a", "arrival": {i}, "input_len": 8, "output_len": 4}}'
                                  for i in range(5)))
    assert main(["fairness", "--workload", str(workload), "--simulate", "--scheduler", "rpm", "--rpm", "1",
                 "--rpm-reject", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["schedulers"]["rpm"]["rejected"] == 4
