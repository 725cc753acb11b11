"""LLM's vLLM-shaped API on the tiny model: chunked ragged batches, stop conditions, seeded
sampling across batch compositions, clear errors that leave everything else working."""
import re

import numpy as np
import pytest

from conftest import ADAPTERS, TINY, lora_request

from jaxserve.config import EngineConfig
from jaxserve import LLM, LoRARequest, RequestOutput, SamplingParams
from jaxserve.lora.peft import AdapterError

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_chunked_prefill_mixed_with_decode_matches_golden(golden):
    """A token budget of 8 splits the 16- and 33-token prompts into chunks that run in the same
    forward as other sequences' decode tokens; outputs still equal HF's."""
    llm = LLM(str(TINY), max_model_len=64, max_num_batched_tokens=8, max_num_seqs=8, page_size=4)
    entry = golden["tiny-llama"]["all-r8-rslora"]
    outs = llm.generate([{"prompt_token_ids": p} for p in entry["prompts"]], GREEDY,
                        lora_request("all-r8-rslora"))
    assert [o.outputs[0].token_ids for o in outs] == entry["greedy"]
    assert llm.pool.num_used("kv") == 0  # the adapter stays cached; every KV page is back


def test_output_shape(tiny_llm):
    out = tiny_llm.generate(["Hello world", "The year"], SamplingParams(temperature=0, max_tokens=5))
    assert [type(o) for o in out] == [RequestOutput, RequestOutput]
    assert out[0].prompt == "Hello world" and out[0].prompt_token_ids == tiny_llm.get_tokenizer().encode("Hello world")
    c = out[0].outputs[0]
    assert out[0].finished and c.index == 0 and len(c.token_ids) <= 5 and c.finish_reason in ("stop", "length")
    assert c.text == tiny_llm.get_tokenizer().decode(c.token_ids)
    assert c.logprobs is None and np.isfinite(c.cumulative_logprob)
    assert out[0].request_id != out[1].request_id


def test_logprobs_include_sampled_token(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=6, logprobs=2, ignore_eos=True)
    c = tiny_llm.generate({"prompt_token_ids": [1, 5, 9]}, params)[0].outputs[0]
    assert len(c.logprobs) == 6
    for token, step in zip(c.token_ids, c.logprobs):
        assert token in step and 2 <= len(step) <= 3 and all(lp <= 0 for lp in step.values())
    np.testing.assert_allclose(c.cumulative_logprob, sum(s[t] for t, s in zip(c.token_ids, c.logprobs)), rtol=1e-6)


def test_seeded_sampling_reproducible_across_batches(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = tiny_llm.generate({"prompt_token_ids": [1, 42, 71]}, params)[0].outputs[0].token_ids
    crowd = [{"prompt_token_ids": [1, 300 + i, 9, 9]} for i in range(5)]
    batch = tiny_llm.generate(crowd[:2] + [{"prompt_token_ids": [1, 42, 71]}] + crowd[2:],
                              [SamplingParams(temperature=1.0, max_tokens=10)] * 2 + [params]
                              + [SamplingParams(temperature=1.0, max_tokens=7)] * 3,
                              [None, lora_request("qv-r4"), None, None, lora_request("all-r8-rslora"), None])
    assert batch[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=10, ignore_eos=True)
    assert tiny_llm.generate({"prompt_token_ids": [1, 42, 71]}, other_seed)[0].outputs[0].token_ids != alone


def test_stop_conditions(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    free = tiny_llm.generate({"prompt_token_ids": [1, 42]}, GREEDY)[0].outputs[0]
    # stop_token_ids: the 4th greedy token ends the request and is kept.
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    c = tiny_llm.generate({"prompt_token_ids": [1, 42]}, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]))[0].outputs[0]
    assert c.token_ids == free.token_ids[:first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_id
    # stop string: taken from the free text, possibly spanning tokens; excluded from the text.
    stop = free.text[5:8]
    c = tiny_llm.generate({"prompt_token_ids": [1, 42]}, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == free.text[:free.text.index(stop)]
    # eos ends a request unless ignore_eos.
    eos = tok.eos_token_ids[0]
    assert tiny_llm.generate({"prompt_token_ids": [1, 42]}, SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=[]))[0].outputs[0].finish_reason in ("stop", "length")
    assert eos == 2


def test_eos_stops_unless_ignored(tiny_llm, monkeypatch):
    free = tiny_llm.generate({"prompt_token_ids": [1, 42]}, GREEDY)[0].outputs[0]
    tok = tiny_llm.get_tokenizer()
    monkeypatch.setattr(tok, "eos_token_ids", (free.token_ids[2],))
    first = free.token_ids.index(free.token_ids[2])
    c = tiny_llm.generate({"prompt_token_ids": [1, 42]}, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert c.token_ids == free.token_ids[:first + 1] and c.finish_reason == "stop" and c.stop_reason is None
    c = tiny_llm.generate({"prompt_token_ids": [1, 42]}, GREEDY)[0].outputs[0]
    assert c.token_ids == free.token_ids and c.finish_reason == "length"


@pytest.mark.parametrize("prompt,match", [
    (123, "prompt 123 is invalid"),
    ({"prompt_token_ids": []}, "non-empty"),
    ({"prompt_token_ids": [1, 384]}, r"\[0, 384\)"),
    ({"prompt_token_ids": list(range(1, 65))}, "max_model_len - 1 = 63"),
    ({"prompt_token_ids": None}, "prompt_token_ids=None is invalid; allowed: a non-empty list"),
    ({"prompt_token_ids": "1 2 3"}, "prompt_token_ids='1 2 3' is invalid"),
    ("abc\ud800", r"allowed: valid Unicode text \(surrogates not allowed at index 3\)"),
])
def test_bad_prompts(tiny_llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        tiny_llm.generate(prompt, GREEDY)
    assert not tiny_llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("message", [{"role": "user", "content": None}, {"role": None, "content": "hi"},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
def test_bad_chat_message_names_itself(tiny_llm, message):
    with pytest.raises(ValueError, match="allowed: 'role' and 'content' strings"):
        tiny_llm.chat([message], GREEDY)


@pytest.mark.parametrize("path", [None, "", 5])
def test_lora_request_without_a_path_is_refused(path):
    with pytest.raises(ValueError, match=r"LoRARequest.lora_path=.* is invalid; allowed: the path"):
        LoRARequest("x", 1, path)


def test_prompt_plus_max_tokens_over_model_len(tiny_llm):
    with pytest.raises(ValueError, match="exceeds max_model_len=64"):
        tiny_llm.generate({"prompt_token_ids": [1] * 60}, SamplingParams(max_tokens=10))


def test_lora_request_list_length_mismatch(tiny_llm):
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        tiny_llm.generate(["a", "b"], GREEDY, [lora_request("qv-r4")])


def test_bad_adapter_fails_alone(tiny_llm, tmp_path, golden):
    """A broken adapter in a batch raises before any work: registered adapters, pages and the
    other requests are untouched, and the same LLM keeps serving correctly."""
    registered = tiny_llm.list_loras()
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    bad = LoRARequest("broken", 99, str(tmp_path))
    good_new = LoRARequest("fresh-name", 98, str(TINY / "adapters" / "qv-r4"))
    with pytest.raises(AdapterError, match="PREFIX_TUNING"):
        tiny_llm.generate([{"prompt_token_ids": [1, 2]}] * 2, GREEDY, [good_new, bad])
    assert tiny_llm.list_loras() == registered  # all or nothing: fresh-name was not registered either
    assert tiny_llm.pool.num_used("kv") == 0
    entry = golden["tiny-llama"]["qv-r4"]
    out = tiny_llm.generate({"prompt_token_ids": entry["prompts"][1]}, GREEDY, lora_request("qv-r4"))
    assert out[0].outputs[0].token_ids == entry["greedy"][1]


def test_add_remove_lora(tiny_llm, tmp_path):
    tiny_llm.add_lora(lora_request("qv-r4"))
    assert "qv-r4" in tiny_llm.list_loras()
    with pytest.raises(ValueError, match="already registered"):
        tiny_llm.add_lora(LoRARequest("qv-r4", 1, str(TINY / "adapters" / "all-r8-rslora")))
    tiny_llm.remove_lora("qv-r4")
    assert "qv-r4" not in tiny_llm.list_loras()
    with pytest.raises(KeyError, match="not registered"):
        tiny_llm.remove_lora("qv-r4")


def test_more_adapters_than_max_loras(golden):
    """Three adapters with at most two per batch: requests wait for their turn and stay exact."""
    llm = LLM(str(TINY), max_model_len=64, max_loras=2, max_lora_rank=16)
    names = list(ADAPTERS) * 2
    prompts = [{"prompt_token_ids": golden["tiny-llama"][n]["prompts"][2]} for n in names]
    outs = llm.generate(prompts, GREEDY, [lora_request(n) for n in names])
    for name, out in zip(names, outs):
        assert out.outputs[0].token_ids == golden["tiny-llama"][name]["greedy"][2]
    assert llm.adapters.loads == 3


@pytest.mark.parametrize("kwargs,match", [({"dtype": "int8"}, "dtype='int8'"),
                                          ({"max_model_len": 10_000}, "max_model_len=10000"),
                                          ({"max_loras": 0}, "max_loras=0"),
                                          ({"kernels": "nope"}, "kernels='nope'")])
def test_bad_llm_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(TINY), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_pool_pages": 0}, r"num_pool_pages=0 is invalid; allowed: None or an integer >= 1"),
    ({"pool_bytes": 1.5}, r"pool_bytes=1.5 is invalid"),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization=1.5 is invalid; allowed: a number in \(0, 1\]"),
    ({"max_model_len": 1}, r"max_model_len=1 is invalid; allowed: None .* or an integer >= 2"),
    ({"dtype": "fp8"}, r"dtype='fp8' is invalid; allowed: auto, float32"),
    ({"scheduler": "fair"}, r"scheduler='fair' is invalid; allowed: fcfs, vtc"),
    ({"scheduler_options": [1]}, r"scheduler_options=\[1\] is invalid"),
    ({"async_overlap": "yes"}, r"async_overlap='yes' is invalid; allowed: True or False"),
    ({"seed": 1.5}, r"seed=1.5 is invalid; allowed: an integer"),
])
def test_engine_config_checks_every_knob_before_loading_anything(kwargs, match):
    """Every knob is checked where the config is made (no model is read for these)."""
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="no-such-model", **kwargs)


def test_sampling_params_changed_after_construction_are_checked_again(tiny_llm):
    params = SamplingParams(max_tokens=4)
    params.temperature = -0.5
    with pytest.raises(ValueError, match=r"SamplingParams.temperature=-0.5 is invalid"):
        tiny_llm.generate({"prompt_token_ids": [1, 2]}, params)
    params.temperature, params.stop = 0.0, 5
    with pytest.raises(ValueError, match=r"SamplingParams.stop=5 is invalid"):
        tiny_llm.engine.add_request("changed", {"prompt_token_ids": [1, 2]}, params)
    assert not tiny_llm.engine.has_unfinished_requests()
    params.stop = "x"  # normalized as at construction
    assert tiny_llm.generate({"prompt_token_ids": [1, 2]}, params)[0].outputs[0].finish_reason in ("length", "stop")


def test_unknown_model():
    with pytest.raises(FileNotFoundError, match="not a known alias"):
        LLM("no-such-model")


def test_removed_adapter_frees_its_pages_without_clobbering_others(golden):
    """Pages freed by remove_lora are reused by the next adapter; the others stay intact."""
    llm = LLM(str(TINY), max_model_len=64, max_loras=3, max_lora_rank=16)
    prompt = {"prompt_token_ids": golden["tiny-llama"]["base"]["prompts"][2]}
    for name in ADAPTERS:  # fill all three slots
        llm.generate(prompt, GREEDY, lora_request(name))
    adapter_pages = llm.pool.num_used("adapter")
    llm.remove_lora("qv-r4")
    assert llm.pool.num_used("adapter") < adapter_pages
    llm.generate(prompt, GREEDY, LoRARequest("again", 7, str(TINY / "adapters" / "qv-r4")))
    assert llm.pool.num_used("adapter") == adapter_pages
    for name in ADAPTERS[1:]:
        out = llm.generate(prompt, GREEDY, lora_request(name))
        assert out[0].outputs[0].token_ids == golden["tiny-llama"][name]["greedy"][2], name


def test_adapter_that_overflows_the_forward_finishes_with_an_error(tiny_llm, tmp_path, golden):
    """Finite weights x 1e18: the forward overflows to NaN/inf logits. That request finishes
    with finish_reason "error" and a message (not token 0 forever); its neighbour is untouched
    and no page stays held."""
    import shutil

    from safetensors.numpy import load_file, save_file
    folder = tmp_path / "huge"
    shutil.copytree(TINY / "adapters" / "qv-r4", folder)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v * np.float32(1e18) for k, v in load_file(weights).items()}, weights)
    entry = golden["tiny-llama"]["qv-r4"]
    prompts = [{"prompt_token_ids": entry["prompts"][0]}, {"prompt_token_ids": entry["prompts"][1]}]
    bad, good = tiny_llm.generate(prompts, GREEDY, [LoRARequest("huge", 77, str(folder)), lora_request("qv-r4")])
    assert bad.finished and bad.outputs[0].finish_reason == "error" and "not finite" in bad.outputs[0].error
    assert bad.outputs[0].token_ids == []
    assert good.outputs[0].token_ids == entry["greedy"][1] and good.outputs[0].error is None
    engine = tiny_llm.engine
    assert not engine.has_unfinished_requests() and engine.pool.num_used("kv") == 0
    tiny_llm.remove_lora("huge")


def test_generate_shows_progress_with_token_speeds(tiny_llm, capsys):
    """As vLLM: a progress bar of finished prompts with input/output tokens per second; none
    with use_tqdm=False."""
    prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}, {"prompt_token_ids": [6]}]
    tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err
    speeds = re.findall(r"est\. speed input: ([\d.]+) toks/s, output: ([\d.]+) toks/s", err)
    assert speeds and float(speeds[-1][0]) > 0 and float(speeds[-1][1]) > 0
    # 6 prompt tokens and 9 generated ones: the final speeds keep that ratio
    assert float(speeds[-1][1]) / float(speeds[-1][0]) == pytest.approx(9 / 6, rel=0.02)
    tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
