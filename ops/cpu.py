"""CPU kernels: the plain-PyTorch reference bodies, fused into C++ loops by inductor.

A decode step runs two ops per layer; eagerly each is ~30 small aten calls, which on CPU
costs more than the attention itself. Compiled once per shape (and cached on disk by
inductor), they run 3-5x faster. ``MOMENTKV_CPU_KERNEL=reference`` keeps the eager bodies;
a machine where inductor cannot compile falls back to them with a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from .kernels import REFERENCES, register


def _fused(reference: Callable) -> Callable:
    compiled = torch.compile(reference, dynamic=False, fullgraph=True)
    state = {"fn": compiled}

    def kernel(*args):
        try:
            return state["fn"](*args)
        except Exception as error:  # no C++ toolchain, or an inductor bug: stay correct, get slower
            if state["fn"] is reference:
                raise
            warnings.warn(f"momentkv: fused CPU kernel unavailable ({type(error).__name__}: {error}); "
                          "using the eager reference", RuntimeWarning, stacklevel=2)
            state["fn"] = reference
            return reference(*args)

    return kernel


def register_fused_cpu_kernels() -> bool:
    """Register the fused CPU kernels unless ``MOMENTKV_CPU_KERNEL=reference``; returns whether it did."""
    choice = os.environ.get("MOMENTKV_CPU_KERNEL", "fused")
    if choice not in ("fused", "reference"):
        raise ValueError(f"MOMENTKV_CPU_KERNEL must be 'fused' or 'reference', got {choice!r}")
    if choice == "reference":
        return False
    for name in ("decode_attention", "evict"):
        register(name, "cpu", _fused(REFERENCES[name]))
    return True
