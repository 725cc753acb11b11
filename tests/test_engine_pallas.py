"""The whole engine on the Pallas kernels (interpret mode on CPU): the tiny golden model with mixed
adapters of ranks 4/8/16 and no adapter, prefill chunks and decode tokens in the same batches,
reproduces HF's greedy tokens."""
import numpy as np
import pytest

from conftest import TINY
from test_engine import add_mixed_batch, check_golden, run_to_completion

from jaxserve import LLM
from jaxserve.engine import Engine
from jaxserve.memory.pool import KV


def test_engine_with_interpret_kernels_matches_hf_golden(golden):
    engine = Engine(model=str(TINY), max_model_len=64, max_num_seqs=16, max_num_batched_tokens=64,
                    num_pool_pages=160, kernels="pallas-interpret", warmup=False)
    cases = add_mixed_batch(engine, golden, np.random.default_rng(1))
    finished = run_to_completion(engine)
    check_golden(finished, cases, golden)
    assert len(finished) == 40
    assert engine.pool.num_used(KV) == 0


def test_compiled_kernels_on_cpu_are_a_clear_error():
    with pytest.raises(ValueError, match="kernels='pallas' compiles for a GPU.*'pallas-interpret'"):
        LLM(str(TINY), kernels="pallas")
