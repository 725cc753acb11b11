"""Tensor parallelism: one model over N local devices (a 1-D jax.sharding.Mesh, axis "tp"), in
Megatron's layout. q/k/v/gate/up are split by output columns (column-parallel: no communication),
o/down by input rows (row-parallel: each device's partial sum, then one all-reduce each), so a
layer costs two all-reduces of [T, hidden]. The embedding and lm_head are split over the
vocabulary (VOCAB_PARALLEL, as vLLM's VocabParallelEmbedding / ParallelLMHead: rows padded to a
multiple of N; one all-reduce of [T, hidden] for the lookup and one all-gather of the logits per
step, against 1/N of their memory); the norms are replicated. The unified pool is split by KV
head along its row (jaxserve/distributed/heads.py lays heads out so every device holds whole KV
heads and the query heads that read them); adapters are split by features in the same pages
(distributed/lora_layout.py).

The step runs under shard_map: inside, each device sees its own shard and the model code runs on
the local config (heads and MLP width / N) with the collectives llama.forward adds when given the
axis name; the batch, the adapters' tables and the logits are replicated.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.distributed.heads import laid_out_config, local_config, padded_index, param_index, take_index
from jaxserve.model.llama import ROW_PARALLEL

AXIS = "tp"
# Param name in layers -> the axis split over the devices (the rest are replicated).
_COLUMN = ("q", "k", "v", "gate", "up", "q_bias", "k_bias", "v_bias")   # last axis: output columns
_ROW = ROW_PARALLEL                                                      # axis 1: input rows
POOL_SPEC = P(None, None, None, None, AXIS)  # [L, 2, pages, page_size, row]: rows split by KV head
# Split the embedding and lm_head over the vocabulary (else replicate them). benchmarks/
# tensor_parallel.py --replicated-vocab sets it False in its worker to measure the alternative.
VOCAB_PARALLEL = True
# How adapters are split (distributed/lora_layout.py): S-LoRA's scheme, or vLLM's default for
# comparison (benchmarks/tensor_parallel.py --lora-scheme vllm sets it in its worker).
LORA_SCHEME = "s-lora"


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    mesh: Mesh
    size: int
    cfg: ModelConfig         # the laid-out model (padded heads), as all devices hold it together
    local_cfg: ModelConfig   # one device's shard of it
    vocab_parallel: bool     # embedding rows / lm_head columns split over the devices
    lora_scheme: str         # "s-lora" or "vllm" (distributed/lora_layout.py)

    @classmethod
    def create(cls, size: int, cfg: ModelConfig) -> "TensorParallel":
        if jax.process_count() > 1:  # multi-host: one mesh over every process's devices
            devices = jax.devices()
            if size != len(devices):
                raise ValueError(f"tensor_parallel_size={size!r} is invalid: {jax.process_count()} processes hold "
                                 f"{len(devices)} devices together; allowed: {len(devices)}")
        devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
        if not 1 <= size <= len(devices):
            raise ValueError(f"tensor_parallel_size={size!r} is invalid: {len(devices)} local "
                             f"{jax.default_backend()} device(s) exist; allowed: 1..{len(devices)} (on a CPU, "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported)")
        if cfg.hidden_size % size:  # (adapter rank-rows are split by features: hidden among them)
            raise ValueError(f"tensor_parallel_size={size!r} is invalid for this model: its hidden_size "
                             f"{cfg.hidden_size} does not split into {size} equal parts; allowed: a divisor of it")
        mesh = Mesh(np.array(devices[:size]), (AXIS,))
        laid_out = laid_out_config(cfg, size)
        return cls(mesh, size, laid_out, local_config(laid_out, size), VOCAB_PARALLEL, LORA_SCHEME)

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def spec(self, name: str, ndim: int) -> P:
        """The split of one param: name is its key in params["layers"] or a top-level key."""
        if name in _COLUMN:
            return P(*([None] * (ndim - 1)), AXIS)
        if name in _ROW:
            return P(None, AXIS, None)
        if self.vocab_parallel and name == "embed":
            return P(AXIS, None)
        if self.vocab_parallel and name == "lm_head":
            return P(None, AXIS)
        return P()

    def param_specs(self, params: dict) -> dict:
        specs = {key: self.spec(key, w.ndim) for key, w in params.items() if key != "layers"}
        specs["layers"] = {name: self.spec(name, w.ndim) for name, w in params["layers"].items()}
        return specs

    def layout_index(self, name: str, model_cfg: ModelConfig) -> tuple[int, np.ndarray] | None:
        """How a param of the model as loaded (model_cfg's layout) becomes the laid-out one:
        heads.param_index, plus the vocabulary padded to whole slices when it is split."""
        if self.vocab_parallel and name in ("embed", "lm_head"):
            vocab = model_cfg.vocab_size
            return (0 if name == "embed" else 1), padded_index(vocab, vocab + -vocab % self.size)
        return param_index(name, model_cfg, self.size)

    def place(self, name: str, w, model_cfg: ModelConfig):
        """One param of the model as loaded (on one device) -> laid out and split over the mesh.
        For params that are computed, not read (random weights): files are read straight into
        their shards (distributed/sharded_load.py)."""
        index = self.layout_index(name, model_cfg)
        if index is not None:
            w = take_index(w, index[1], index[0])
        if jax.process_count() > 1:  # (a host array: the same on every process, each keeps its shards)
            w = np.asarray(w)
        return jax.device_put(w, self.sharding(self.spec(name, w.ndim)))
