"""jaxserve: one base LLM, thousands of LoRA adapters, many tenants — in JAX/Pallas."""
import logging as _logging
import os as _os

# Like vLLM: start-up facts (pool size, compile counts) are logged at INFO unless told otherwise.
_logger = _logging.getLogger("jaxserve")
if not _logger.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("%(levelname)s jaxserve: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_os.environ.get("JAXSERVE_LOG_LEVEL", "INFO"))
from jaxserve.llm import LLM
from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling import SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
