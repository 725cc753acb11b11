"""The throughput benchmark's bare jitted loop (benchmarks/minimal_jax.py) is only a fair floor
if it computes what the engine computes: its greedy tokens must equal the engine's, on the tiny
Llama and Qwen2 (q/k/v bias) fixtures, for ragged prompts in more than one batch."""
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

from jaxserve import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import minimal_jax  # noqa: E402


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_bare_loop_matches_the_engine(model):
    llm = LLM(str(FIXTURES / model), max_model_len=64, max_num_seqs=4)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, rng.integers(2, 20)).tolist() for _ in range(6)]
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                         SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
    got = minimal_jax.generate(llm.engine.runner.params, llm.model_config, prompts, 4, 20, 10)
    assert got.tolist() == want
