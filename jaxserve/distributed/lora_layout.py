"""Adapters under tensor parallelism: where each device's part of an adapter sits in the split
pool. Each device holds its part of every resident adapter, in its slice of the same pool pages
(one page list, one free list). Two schemes (TensorParallel.lora_scheme):

- "s-lora" (the default; S-LoRA's, 1/N of every adapter per device):
  column-parallel modules (q/k/v, gate/up) keep share d of A's rank-rows (rows d x r' ..
  (d+1) x r' over all inputs, r' = ceil(r / N), the rank zero-padded to N x r') and device d's
  output columns of every B^T row; the model all-gathers the [T, r'] shrinks (llama._tp_lora).
  Row-parallel modules (o, down) keep device d's input columns of A's rows (a partial shrink,
  all-reduced) and its output columns of B^T's.
- "vllm" (vLLM's default, for comparison): column modules keep A whole and their output columns
  of B^T; row modules their input columns of A and B^T whole — no collective of their own (the
  row modules' full-width partial outputs ride the base all-reduce), more memory per device.

On one device the layout is jaxserve/lora/layout.py's for `lora_view(cfg, n, scheme)`: the
laid-out model with the features of one device, widened where a factor is kept whole, and
column modules' ranks split over N under "s-lora" (rank_parts); the pages of the N devices'
packs are concatenated along the row, which the split pool array hands back out.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.distributed.heads import head_plan, pad_axis, padded_intermediate, take_heads
from jaxserve.lora.layout import AdapterLayout, pack_rows
from jaxserve.lora.peft import LoRAWeights, PeftAdapter

COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
SCHEMES = ("s-lora", "vllm")


@dataclasses.dataclass(frozen=True)
class LoRAView(ModelConfig):
    """The shapes one device's adapter parts have: the model's config with heads, hidden and MLP
    width / N (kv_size: its part of a pool row; module_shape: fan-in and fan-out / N, except
    where the scheme keeps a factor's features whole) and, under "s-lora", column modules' ranks
    split over the N devices."""
    devices: int = 1
    scheme: str = "s-lora"

    def module_shape(self, module: str) -> tuple[int, int]:
        fan_in, fan_out = super().module_shape(module)
        if module in COLUMN_MODULES:  # x is replicated: A reads all of it
            return fan_in * self.devices, fan_out
        return fan_in, (fan_out * self.devices if self.scheme == "vllm" else fan_out)  # vllm: B^T whole

    def rank_parts(self, module: str) -> int:
        return self.devices if self.scheme == "s-lora" and module in COLUMN_MODULES else 1


def lora_view(laid_out: ModelConfig, n: int, scheme: str = "s-lora") -> LoRAView:
    """One device's adapter shapes for the laid-out model (hidden size divisible by N)."""
    fields = {f.name: getattr(laid_out, f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(hidden_size=laid_out.hidden_size // n, num_heads=laid_out.num_heads // n,
                  num_kv_heads=laid_out.num_kv_heads // n, intermediate_size=laid_out.intermediate_size // n)
    return LoRAView(**fields, devices=n, scheme=scheme)


def _heads(m: np.ndarray, src: tuple[int, ...], head_dim: int) -> np.ndarray:
    return take_heads(m, src, head_dim, axis=1, xp=np)


def _pad(m: np.ndarray, width: int) -> np.ndarray:
    return pad_axis(m, width, axis=1, xp=np)


def lay_out_adapter(adapter: PeftAdapter, cfg: ModelConfig, n: int) -> PeftAdapter:
    """The adapter's factors in the laid-out model's feature order (heads.py's head plan, the
    MLP padded): q/k/v's B by the query / KV head plan, o's A by the query plan, gate/up's B and
    down's A padded with zeros."""
    plan = head_plan(cfg.num_heads, cfg.num_kv_heads, n)
    inter, d = padded_intermediate(cfg.intermediate_size, n), cfg.head_dim
    weights = {}
    for key, w in adapter.weights.items():
        a, b = w.a, w.b
        module = key[1]
        if module == "q_proj":
            b = _heads(b, plan.q_src, d)
        elif module in ("k_proj", "v_proj"):
            b = _heads(b, plan.kv_src, d)
        elif module == "o_proj":
            a = _heads(a, plan.q_src, d)
        elif module in ("gate_proj", "up_proj"):
            b = _pad(b, inter)
        elif module == "down_proj":
            a = _pad(a, inter)
        weights[key] = LoRAWeights(a, b, w.scaling)
    return dataclasses.replace(adapter, weights=weights)


def device_slice(adapter: PeftAdapter, layout: AdapterLayout, view: LoRAView, d: int) -> PeftAdapter:
    """Device d's part (see the module docstring). Under "s-lora" every column module's rank is
    zero-padded to the layout's N x r' first, so its rank shares line up with the B^T rows the
    tables read."""
    n = view.devices

    def columns(m):
        width = m.shape[1] // n
        return m[:, d * width:(d + 1) * width]

    weights = {}
    for key, w in adapter.weights.items():
        spec, column = layout.modules[key[1]], key[1] in COLUMN_MODULES
        if view.scheme == "vllm":
            a, b = (w.a, columns(w.b)) if column else (columns(w.a), w.b)
        elif column:
            a, b = (np.pad(m, ((0, spec.b_rank - m.shape[0]), (0, 0))) for m in (w.a, w.b))
            a, b = a[d * spec.a_rank:(d + 1) * spec.a_rank], columns(b)
        else:
            a, b = columns(w.a), columns(w.b)
        weights[key] = LoRAWeights(a, b, w.scaling)
    return dataclasses.replace(adapter, weights=weights)


def pack_split(adapter: PeftAdapter, layout: AdapterLayout, view: LoRAView, page_size: int, dtype, *,
               model_cfg: ModelConfig) -> np.ndarray:
    """The adapter's pages for the split pool, [L, 2, pages, page_size, N x view.kv_size]: each
    device's pack (layout.py's, on the view) side by side along the row."""
    laid_out = lay_out_adapter(adapter, model_cfg, view.devices)
    return np.concatenate([pack_rows(device_slice(laid_out, layout, view, d), layout, view, page_size, dtype)
                           for d in range(view.devices)], axis=-1)
