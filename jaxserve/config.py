"""Model and engine configuration.

ModelConfig is built from an HF config.json dict (or the same dict made from GGUF metadata), so
every loader speaks one dialect: HF's.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# LoRA-targetable projections, in the order the model applies them.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF's rope_scaling dict ({"rope_type": "llama3", "factor": ..} or {"rope_type": "linear", ..}).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} is not supported; allowed: {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        # transformers >= 5 writes "rope_parameters" (theta + scaling) instead of the two keys.
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported; allowed: llama3, linear")
            scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
            scaling = None if kind == "default" else tuple(sorted({**scaling, "rope_type": kind}.items()))
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM" or d.get("attention_bias", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
        )

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-targetable projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }[module]

    def rank_parts(self, module: str) -> int:
        """Over how many devices a module's LoRA rank is split: 1 (tensor parallelism's adapter
        view, distributed/lora_layout.py, splits column-parallel modules' ranks)."""
        return 1


ADAPTER_MEMORY = ("unified", "separate", "padded")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine needs; LLM(**kwargs) builds one. See README for each knob."""
    model: str = "smollm2"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_loras: int = 32                 # distinct adapters in ONE batch (reserves no memory)
    max_lora_rank: int = 16
    lora_modules: tuple[str, ...] = LORA_MODULES  # modules adapters may adapt (fixed: bounds compiles)
    # Where adapters live: "unified" (S-LoRA: one pool for KV and adapters); the baselines
    # "separate" (a region of adapter_region_pages beside the KV pages, adapters paged at their
    # own ranks: S-LoRA's no-unify-mem ablation) and "padded" (vLLM's fixed slots: that region
    # holds max_loras slots, every adapter stored and computed at max_lora_rank on every module).
    adapter_memory: str = "unified"
    adapter_region_pages: int | None = None  # default: max_loras slots of the largest adapter
    seed: int = 0
    page_size: int = 16
    max_num_seqs: int = 128             # measured on the 2-core CPU: see README (defaults)
    max_num_batched_tokens: int = 512
    pool_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    num_pool_pages: int | None = None
    kernels: str = "xla"                 # kernel backend (jaxserve/pallas/ops.py)
    tensor_parallel_size: int = 1       # devices the model is split over (jaxserve/distributed/)
    # Multi-host (distributed/multihost.py): this process's place in a group joined by
    # jax.distributed at coordinator_address ("host:port"); process 0 leads, the others follow.
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    scheduler: object = "fcfs"          # a name in jaxserve.sched.SCHEDULERS, or a Scheduler object
    scheduler_options: dict | None = None  # e.g. {"weights": {"alice": 2}} for "vtc", {"rpm": 20} for "rpm"
    # Compile every batch shape at start-up (JAXSERVE_WARMUP=0 makes the default False: shapes
    # then compile on first use — quicker start-ups for tests and short scripts).
    warmup: bool = dataclasses.field(default_factory=lambda: os.environ.get("JAXSERVE_WARMUP", "1") != "0")
    async_overlap: bool = True          # dispatch step N+1 before reading step N's tokens

    def __post_init__(self):
        for name in ("max_loras", "max_lora_rank", "page_size", "max_num_seqs", "max_num_batched_tokens",
                     "tensor_parallel_size", "num_processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is invalid; allowed: at "
                             f"least max_num_seqs={self.max_num_seqs} (every running sequence decodes each step)")
        unknown = [m for m in self.lora_modules if m not in LORA_MODULES]
        if unknown or not self.lora_modules:
            raise ValueError(f"lora_modules={self.lora_modules!r} is invalid; allowed: a non-empty subset of "
                             f"{', '.join(LORA_MODULES)}")
        self._check_model_and_pool()
        self._check_choices()
        self._check_processes()

    def _check_processes(self):
        n = self.num_processes
        if not (isinstance(self.process_id, int) and not isinstance(self.process_id, bool) and 0 <= self.process_id < n):
            raise ValueError(f"process_id={self.process_id!r} is invalid; allowed: 0..{n - 1} (num_processes={n})")
        address = self.coordinator_address
        if n > 1 and not (isinstance(address, str) and address.rpartition(":")[2].isdigit()):
            raise ValueError(f"coordinator_address={address!r} is invalid with num_processes={n}; allowed: "
                             f"'host:port' of process 0")

    def _check_model_and_pool(self):
        def bad(name, allowed):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(self.model, str) or not self.model:
            bad("model", '"smollm2", an HF folder (config.json + safetensors) or a .gguf file')
        if self.dtype not in DTYPES:
            bad("dtype", ", ".join(DTYPES))
        if self.max_model_len is not None and not (whole(self.max_model_len) and self.max_model_len >= 2):
            bad("max_model_len", "None (the model's limit, at most 2048) or an integer >= 2")
        if self.num_pool_pages is not None and not (whole(self.num_pool_pages) and self.num_pool_pages >= 1):
            bad("num_pool_pages", "None or an integer >= 1")
        if self.pool_bytes is not None and not (whole(self.pool_bytes) and self.pool_bytes >= 1):
            bad("pool_bytes", "None or an integer >= 1 (at least one page is needed)")
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            bad("gpu_memory_utilization", "a number in (0, 1]")
        if not whole(self.seed):
            bad("seed", "an integer")

    def _check_choices(self):
        from jaxserve.pallas.ops import available_backends  # (kernels and policies import this module)
        from jaxserve.sched import SCHEDULERS, Scheduler

        if self.kernels not in available_backends():
            raise ValueError(f"kernels={self.kernels!r} is invalid; allowed: {', '.join(available_backends())}")
        if not isinstance(self.scheduler, Scheduler) and self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r} is invalid; allowed: {', '.join(SCHEDULERS)} or a "
                             f"Scheduler object")
        if self.adapter_memory not in ADAPTER_MEMORY:
            raise ValueError(f"adapter_memory={self.adapter_memory!r} is invalid; allowed: {', '.join(ADAPTER_MEMORY)}")
        if self.adapter_memory == "padded" and self.tensor_parallel_size > 1:
            raise ValueError(f"adapter_memory='padded' is invalid with tensor_parallel_size={self.tensor_parallel_size}"
                             f"; allowed: 'unified' or 'separate' (the padded baseline is single-device)")
        region = self.adapter_region_pages
        if region is not None and not (isinstance(region, int) and not isinstance(region, bool) and region >= 1):
            raise ValueError(f"adapter_region_pages={region!r} is invalid; allowed: None or an integer >= 1")
        if self.scheduler_options is not None and not isinstance(self.scheduler_options, dict):
            raise ValueError(f"scheduler_options={self.scheduler_options!r} is invalid; allowed: None or a dict")
        for name in ("warmup", "async_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: True or False")
