"""jaxserve: one base LLM, thousands of LoRA adapters, many tenants — in JAX/Pallas."""
from jaxserve.llm import LLM
from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling import SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
