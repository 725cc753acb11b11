import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Engines compile the shapes they use on first use instead of every shape at start-up: a test
# uses a few of ~30 variants. Tests of the warm-up itself ask for warmup=True.
os.environ.setdefault("JAXSERVE_WARMUP", "0")

from jaxserve import runtime  # noqa: E402  (after the environment above)

runtime.setup_process()  # the suite is an entry point: compilation cache, compile counter

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-llama"
ADAPTERS = ("qv-r4", "all-r8-rslora", "regex-r16-pattern")


@pytest.fixture(scope="session")
def golden():
    return json.loads((FIXTURES / "golden.json").read_text())


@pytest.fixture(scope="session")
def tiny_llm():
    """The tiny GQA Llama, with room for every fixture adapter at once."""
    from jaxserve import LLM
    return LLM(str(TINY), max_model_len=64, max_loras=4, max_lora_rank=16)


def lora_request(name: str):
    from jaxserve import LoRARequest
    return LoRARequest(name, ADAPTERS.index(name) + 1, str(TINY / "adapters" / name))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each loaded XLA executable holds
    memory mappings (an Engine's ~45 programs: ~4,000), and a process has at most
    vm.max_map_count (65,530) of them: the whole suite in one process would cross it and crash
    inside XLA. Programs still needed come back from the persistent compilation cache."""
    yield
    import gc
    import jax
    jax.clear_caches()
    gc.collect()
