"""Write random PEFT LoRA adapters for a base model: demo adapters and test data.

The folders are real PEFT folders (adapter_config.json + adapter_model.safetensors with PEFT's
tensor names), so they exercise the same loader as adapters trained elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxserve.config import ATTN_MODULES, ModelConfig


def write_random_adapter(folder, cfg: ModelConfig, rank: int = 8, alpha: float = 16.0,
                         target_modules=("q_proj", "v_proj"), seed: int = 0, b_std: float = 0.02,
                         use_rslora: bool = False) -> Path:
    """A PEFT adapter with Gaussian A and B (B is non-zero, unlike a freshly initialised one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in target_modules:
            fan_in, fan_out = cfg.module_shape(module)
            block = "self_attn" if module in ATTN_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * b_std).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(target_modules), "bias": "none", "use_rslora": use_rslora,
              "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
              "lora_dropout": 0.0, "fan_in_fan_out": False, "init_lora_weights": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
