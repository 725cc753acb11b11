"""What every jaxserve Pallas kernel shares about the GPU lowering: the Triton backend chosen
explicitly, and the small shape helpers Triton's power-of-two, whole-array-block style needs.

jax >= 0.11 warns that the Pallas Triton backend is deprecated, at *lowering* time — which under
an outer jit happens outside any call of ours — so the entry points silence that one message
process-wide (`runtime.setup_process`); `quiet()` covers an eager call without it.
"""
from __future__ import annotations

import contextlib
import warnings

from jax.experimental import pallas as pl

try:  # the Triton backend's public module; present in jax 0.10 - 0.12
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a jax without it: interpret mode still works
    pltriton = None

from jaxserve.runtime import TRITON_DEPRECATION


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
        yield


def compiler_params(num_warps: int, num_stages: int):
    """Triton CompilerParams (older spelling as a fallback), or None when this jax has no Triton
    backend (then only interpret mode runs)."""
    if pltriton is None:
        return None
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams", None)
    return None if cls is None else cls(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def whole_block(shape):
    """A block that is the whole array: Triton has no scalar prefetch, so kernels index it themselves."""
    nd = len(shape)
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * nd)
