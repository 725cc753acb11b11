"""LoRA adapters: loading PEFT folders into host memory."""
from jaxserve.lora.peft import AdapterError, LoRAWeights, PeftAdapter, load_peft_adapter

__all__ = ["AdapterError", "LoRAWeights", "PeftAdapter", "load_peft_adapter"]
