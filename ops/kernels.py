"""Which kernel each op runs on each device, so eager code can call it without the dispatcher.

A custom op's Python dispatch costs ~200 us per call on CPU, more than a fused kernel; the
decode step therefore calls :func:`kernel` directly in eager mode and the op itself (an
opaque graph node) under ``torch.compile``. Registering here registers with torch.library too,
so both paths always run the same code.
"""

from __future__ import annotations

from typing import Callable

import torch

from .decode_attention import decode_attention, decode_attention_reference
from .evict import evict, evict_reference
from .prefill_scores import prefill_scores, prefill_scores_reference

OPS = {"decode_attention": decode_attention, "evict": evict, "prefill_scores": prefill_scores}
REFERENCES = {
    "decode_attention": decode_attention_reference,
    "evict": evict_reference,
    "prefill_scores": prefill_scores_reference,
}
_KERNELS: dict[tuple[str, str], Callable] = {}


def register(name: str, device_type: str, fn: Callable) -> None:
    """Make ``fn`` the ``device_type`` kernel of op ``name``."""
    OPS[name].register_kernel(device_type)(fn)
    _KERNELS[(name, device_type)] = fn


def kernel(name: str, device: torch.device) -> Callable:
    """The kernel op ``name`` dispatches to on ``device`` (the reference where none is registered)."""
    return _KERNELS.get((name, device.type), REFERENCES[name])


def call(name: str, *args):
    """Run op ``name``: as a graph node while compiling, directly on its kernel otherwise."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.momentkv, name).default(*args)
    return kernel(name, args[0].device)(*args)
