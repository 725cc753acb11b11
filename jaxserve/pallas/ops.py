"""The one dispatch point for jaxserve's kernels.

The model calls a backend's ops from here and never a backend directly. A backend is a `Backend`:
`prepare(batch, lora, pool, plan)` runs once per step, outside the layer loop, and returns
metadata every layer reuses; `paged_attention(q, k_new, v_new, pool, layer, meta, scale)` and
`lora_deltas(x, pool, layer, meta, modules, out_features, combine_shrink=None)` (modules that
share the input x, e.g. q/k/v; combine_shrink, if given, maps the shrink [..., R] to
[..., K, R] before the expand: tensor parallelism all-reduces or all-gathers it there, see
reference.lora_delta) run per layer. reference.py is the spec:
a backend must compute what it computes. The engine picks a backend by name
(`EngineConfig.kernels`):

- "xla" (default): the fast XLA ops (xla.py) — grouped LoRA, blocked paged attention; the serving
  path on CPU and TPU, and on GPU until the Pallas kernels are measured faster there.
- "reference": the pure-XLA spec ops (per-token gathers; clear, slow).
- "pallas": the Pallas kernels compiled for the GPU through the Triton backend
  (paged_attention.py: flash-decoding paged attention; lora.py: MBGMV / SGMV multi-LoRA).
- "pallas-interpret": the same kernel bodies run by Pallas' interpreter, on any device: how the
  kernels are tested on CPU (slow — for tests and debugging, not serving).

A kernel written with the spec's per-op signature (reference.paged_attention / lora_delta)
registers with `register_backend(name, paged_attention=..., lora_delta=...)`; ops it lacks fall
back to the reference. A TPU (Mosaic) or jax-triton kernel would register the same way.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax

from jaxserve.pallas import lora, paged_attention, reference, xla

DEFAULT = "xla"


class Backend(NamedTuple):
    prepare: Callable          # (batch, lora, pool, plan) -> meta, once per step
    paged_attention: Callable  # (q, k_new, v_new, pool, layer, meta, scale) -> [T, H, D]
    lora_deltas: Callable      # (x, pool, layer, meta, modules, out_features, combine_shrink) -> ([T, out_m] f32, ...)
    page_buckets: bool         # wants page tables cut to the batch's longest sequence (a shape bucket)
    lora_tiles: bool           # takes a LoRA tile count from the runner (StepPlan.lora_tiles)


def _spec_prepare(batch, lora, pool, plan):
    return {"batch": batch, "lora": lora, "valid": batch.slot_mapping >= 0}


def _spec_backend(attention: Callable, lora_op: Callable) -> Backend:
    """A backend from ops with the spec's explicit per-op arguments (reference.py's signatures)."""
    def attend(q, k_new, v_new, pool, layer, meta, scale):
        b = meta["batch"]
        return attention(q, k_new, v_new, pool, layer, b.page_tables, b.token_seq, b.positions, b.cached_lens,
                         meta["valid"], scale)

    def deltas(x, pool, layer, meta, modules, out_features, combine_shrink=None):
        tables = [meta["lora"][m] for m in modules]
        return tuple(lora_op(x, pool, layer, t["a_rows"], t["b_rows"], t["rank"], meta["batch"].lora_ids, out,
                             b_ranks=t["b_rank"], combine_shrink=combine_shrink)
                     for t, out in zip(tables, out_features))

    return Backend(_spec_prepare, attend, deltas, page_buckets=True, lora_tiles=False)


_BACKENDS: dict[str, Backend] = {
    "reference": _spec_backend(reference.paged_attention, reference.lora_delta),
    "xla": Backend(xla.prepare, xla.paged_attention, xla.lora_deltas, page_buckets=False, lora_tiles=True),
}
# Backends that only compile for an accelerator: asking for one on a CPU is a clear error up front.
_NEEDS_ACCELERATOR = {"pallas": "pallas-interpret"}


def register_backend(name: str, paged_attention: Callable | None = None, lora_delta: Callable | None = None) -> None:
    """Make spec-signature kernels selectable by name; an op left out falls back to the reference."""
    _BACKENDS[name] = _spec_backend(paged_attention or reference.paged_attention, lora_delta or reference.lora_delta)


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_ops(backend: str = DEFAULT) -> Backend:
    if backend not in _BACKENDS:
        raise ValueError(f"kernels={backend!r} is not available; allowed: {', '.join(_BACKENDS)}")
    return _BACKENDS[backend]


def check_backend(backend: str) -> None:
    """Fail at start-up, not at the first step: an unknown backend, or a compiled-only one on CPU."""
    get_ops(backend)
    if backend in _NEEDS_ACCELERATOR and jax.default_backend() == "cpu":
        raise ValueError(f"kernels={backend!r} compiles for a GPU and this process runs on CPU; on CPU use "
                         f"'xla' (fast, the default) or {_NEEDS_ACCELERATOR[backend]!r} (the same kernels, "
                         f"interpreted)")


register_backend("pallas", paged_attention=paged_attention.paged_attention, lora_delta=lora.lora_delta)
register_backend("pallas-interpret", paged_attention=partial(paged_attention.paged_attention, interpret=True),
                 lora_delta=partial(lora.lora_delta, interpret=True))
