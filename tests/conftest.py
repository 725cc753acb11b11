import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
