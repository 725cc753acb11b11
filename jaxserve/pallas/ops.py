"""The one dispatch point for jaxserve's kernels.

The model calls `paged_attention` and `lora_delta` from here and never a backend directly. Each op
has one calling convention (reference.py is the spec); a backend registers its implementation
under a name and the engine picks one by name (`EngineConfig.kernels`):

- "reference": the pure-XLA ops (any device; the CPU default).
- "pallas": the Pallas kernels compiled for the GPU through the Triton backend
  (paged_attention.py: flash-decoding paged attention; lora.py: MBGMV / SGMV multi-LoRA).
- "pallas-interpret": the same kernel bodies run by Pallas' interpreter, on any device: how the
  kernels are tested on CPU (slow — for tests and debugging, not serving).

A TPU (Mosaic) kernel or a native Triton kernel through jax-triton would register here the same
way (`register_backend("pallas-tpu", paged_attention=..., lora_delta=...)`), behind the same
calling convention; none exists yet.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import jax

from jaxserve.pallas import lora, paged_attention, reference

_BACKENDS: dict[str, dict[str, Callable]] = {
    "reference": {"paged_attention": reference.paged_attention, "lora_delta": reference.lora_delta},
}
# Backends that only compile for an accelerator: asking for one on a CPU is a clear error up front.
_NEEDS_ACCELERATOR = {"pallas": "pallas-interpret"}


def register_backend(name: str, **ops: Callable) -> None:
    """Make a kernel backend selectable by name; ops missing from it fall back to the reference."""
    _BACKENDS[name] = {**_BACKENDS["reference"], **ops}


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_ops(backend: str = "reference") -> dict[str, Callable]:
    if backend not in _BACKENDS:
        raise ValueError(f"kernels={backend!r} is not available; allowed: {', '.join(_BACKENDS)}")
    return _BACKENDS[backend]


def check_backend(backend: str) -> None:
    """Fail at start-up, not at the first step: an unknown backend, or a compiled-only one on CPU."""
    get_ops(backend)
    if backend in _NEEDS_ACCELERATOR and jax.default_backend() == "cpu":
        raise ValueError(f"kernels={backend!r} compiles for a GPU and this process runs on CPU; on CPU use "
                         f"'reference' (fast) or {_NEEDS_ACCELERATOR[backend]!r} (the same kernels, interpreted)")


register_backend("pallas", paged_attention=paged_attention.paged_attention, lora_delta=lora.lora_delta)
register_backend("pallas-interpret", paged_attention=partial(paged_attention.paged_attention, interpret=True),
                 lora_delta=partial(lora.lora_delta, interpret=True))
