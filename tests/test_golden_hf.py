"""jaxserve against HF transformers + PEFT golden outputs (tests/fixtures/make_fixtures.py).

Tolerance for logprobs: both sides run in float32; they differ only in summation order (fused
einsums vs torch matmuls, flat vs per-head softmax), which moves a logprob of a 2-layer model by
~1e-5 (observed <= 4e-5). 2e-4 leaves room across BLAS builds yet is ten times below the smallest
top1-top2 gap in the fixtures (2e-3), so a pass also means no argmax could have flipped.
"""
import numpy as np
import pytest

from conftest import ADAPTERS, FIXTURES, lora_request

from jaxserve import LLM, SamplingParams

LOGPROB_TOL = 2e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)


def assert_matches(output, expected_ids, expected_top5):
    completion = output.outputs[0]
    assert completion.token_ids == expected_ids
    assert completion.finish_reason == "length"
    assert len(completion.logprobs) == len(expected_top5)
    for step, (got, want) in enumerate(zip(completion.logprobs, expected_top5)):
        want_ids = [tid for tid, _ in want]
        got_top = sorted(got.items(), key=lambda kv: -kv[1])[:5]
        assert [tid for tid, _ in got_top] == want_ids, f"step {step}"
        np.testing.assert_allclose([got[t] for t in want_ids], [lp for _, lp in want], atol=LOGPROB_TOL)
    np.testing.assert_allclose(completion.cumulative_logprob,
                               sum(top[0][1] for top in expected_top5), atol=LOGPROB_TOL * len(expected_ids))


def prompts_of(entry):
    return [{"prompt_token_ids": p} for p in entry["prompts"]]


@pytest.mark.parametrize("model", ["tiny-llama3", "tiny-qwen2"])
def test_other_architectures_match_hf(model, golden):
    # tiny-llama3: llama3 rope scaling, rope_theta 5e5, tied, sharded safetensors;
    # tiny-qwen2: q/k/v bias, tied, one KV head for four query heads.
    llm = LLM(str(FIXTURES / model), max_model_len=64)
    entry = golden[model]["base"]
    for output, ids, top5 in zip(llm.generate(prompts_of(entry), GREEDY), entry["greedy"], entry["top5"]):
        assert_matches(output, ids, top5)


@pytest.mark.parametrize("adapter", ("base",) + ADAPTERS)
def test_tiny_llama_matches_hf_alone(adapter, tiny_llm, golden):
    entry = golden["tiny-llama"][adapter]
    lora = None if adapter == "base" else lora_request(adapter)
    for prompt, ids, top5 in zip(prompts_of(entry), entry["greedy"], entry["top5"]):
        assert_matches(tiny_llm.generate(prompt, GREEDY, lora)[0], ids, top5)


def test_adapters_change_the_output(golden):
    base = golden["tiny-llama"]["base"]["greedy"]
    for adapter in ADAPTERS:
        assert golden["tiny-llama"][adapter]["greedy"] != base, adapter


def test_mixed_adapter_batch_equals_each_alone(tiny_llm, golden):
    """Every prompt with every adapter (and none), shuffled into ONE generate call: each output
    equals the HF golden run alone — ranks 4, 8, 16 and 6 and a base token share each forward."""
    cases = [(a, i) for a in ("base",) + ADAPTERS for i in range(4)]
    order = np.random.default_rng(0).permutation(len(cases))
    cases = [cases[k] for k in order]
    prompts = [{"prompt_token_ids": golden["tiny-llama"][a]["prompts"][i]} for a, i in cases]
    loras = [None if a == "base" else lora_request(a) for a, _ in cases]
    outputs = tiny_llm.generate(prompts, GREEDY, loras)
    for (adapter, i), output in zip(cases, outputs):
        entry = golden["tiny-llama"][adapter]
        assert_matches(output, entry["greedy"][i], entry["top5"][i])


def test_tokenizer_matches_hf(tiny_llm, golden):
    tok = tiny_llm.get_tokenizer()
    for case in golden["tiny-llama"]["tokenize"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["decoded"]


def test_chat_template_matches_hf(tiny_llm, golden):
    chat = golden["tiny-llama"]["chat"]
    tok = tiny_llm.get_tokenizer()
    assert tok.apply_chat_template(chat["messages"]) == chat["text"]
    assert tok.encode_chat(chat["messages"]) == chat["ids"]
    out = tiny_llm.chat(chat["messages"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.prompt_token_ids == chat["ids"] and out.prompt == chat["text"]


def test_bfloat16_close_to_hf_float32(golden):
    """dtype="bfloat16" (the GPU default) on the same weights: bf16 keeps 8 mantissa bits, so
    logits of magnitude ~10 move by ~0.05-0.2; the leading greedy tokens (top-1 margins >= 0.04
    but mostly far larger) still agree, and the chosen token's logprob stays within 0.3."""
    llm = LLM(str(FIXTURES / "tiny-llama"), dtype="bfloat16", max_model_len=64)
    assert llm.device_pool.array.dtype == np.dtype("bfloat16")
    for adapter in ("base", "all-r8-rslora"):
        entry = golden["tiny-llama"][adapter]
        outs = llm.generate(prompts_of(entry), GREEDY, None if adapter == "base" else lora_request(adapter))
        for out, ids, top5 in zip(outs, entry["greedy"], entry["top5"]):
            c = out.outputs[0]
            assert c.token_ids[:4] == ids[:4]
            np.testing.assert_allclose([c.logprobs[i][ids[i]] for i in range(4)],
                                       [top5[i][0][1] for i in range(4)], atol=0.3)
