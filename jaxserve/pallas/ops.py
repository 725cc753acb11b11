"""The one dispatch point for jaxserve's kernels.

The model calls `paged_attention` and `lora_delta` from here and never a backend directly. Each op
has one calling convention (see reference.py, which is the spec); a backend registers its
implementation under a name and the engine picks one by name ("reference" today; Pallas kernels —
Triton on GPU, interpret mode on CPU — and TPU/Mosaic or jax-triton kernels register here later).
"""
from __future__ import annotations

from typing import Callable

from jaxserve.pallas import reference

_BACKENDS: dict[str, dict[str, Callable]] = {
    "reference": {"paged_attention": reference.paged_attention, "lora_delta": reference.lora_delta},
}


def register_backend(name: str, **ops: Callable) -> None:
    """Make a kernel backend selectable by name; ops missing from it fall back to the reference."""
    _BACKENDS[name] = {**_BACKENDS["reference"], **ops}


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_ops(backend: str = "reference") -> dict[str, Callable]:
    if backend not in _BACKENDS:
        raise ValueError(f"kernels={backend!r} is not available; allowed: {', '.join(_BACKENDS)}")
    return _BACKENDS[backend]
