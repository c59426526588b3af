"""CPU kernels: the plain-PyTorch reference bodies, fused into C++ loops by inductor.

A decode step runs two ops per layer; eagerly each is ~30 small aten calls, which on CPU
costs more than the attention itself. Compiled once per shape (and cached on disk by
inductor), they run 3-5x faster. ``MOMENTKV_CPU_KERNEL=reference`` keeps the eager bodies;
a machine where inductor cannot compile falls back to them with a warning.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Callable

import torch

from .kernels import REFERENCES, register


def _fused(reference: Callable) -> Callable:
    # One compiled copy per setting of the op's non-tensor arguments (budget, policy, window...):
    # dynamo caps recompiles per code object, and a process comparing many settings (an eval
    # sweep) would otherwise hit the cap and fall back to the slow eager body.
    compiled: dict[tuple, Callable] = {}
    state = {"fused": True}

    def kernel(*args):
        if not state["fused"]:
            return reference(*args)
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        if key not in compiled:
            copy = types.FunctionType(reference.__code__.replace(), reference.__globals__, reference.__name__,
                                      reference.__defaults__)
            compiled[key] = torch.compile(copy, dynamic=False, fullgraph=True)
        try:
            return compiled[key](*args)
        except Exception as error:  # no C++ toolchain, or an inductor bug: stay correct, get slower
            warnings.warn(f"momentkv: fused CPU kernel unavailable ({type(error).__name__}: {error}); "
                          "using the eager reference", RuntimeWarning, stacklevel=2)
            state["fused"] = False
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
