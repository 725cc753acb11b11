"""`jaxserve generate` over the Python API."""
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
