"""Which kernel each op runs on each device, so eager code can call it without the dispatcher.

Going through torch's dispatcher added ~90 us to a ~110 us fused CPU attention call
(results/profile-step-cpu.json); :func:`call` therefore runs the kernel directly in eager mode and
the op itself (an opaque graph node) under ``torch.compile``. Registering here registers with
torch.library too, so both paths always run the same code. Callers use the typed wrappers of
:mod:`momentkv.ops.layer`, not :func:`call`.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from .decode_attention import decode_attention, decode_attention_reference
from .decode_step import decode_step, decode_step_reference
from .evict import evict, evict_reference
from .prefill_scores import prefill_scores, prefill_scores_reference

OPS = {"decode_attention": decode_attention, "decode_step": decode_step, "evict": evict,
       "prefill_scores": prefill_scores}
REFERENCES = {
    "decode_attention": decode_attention_reference,
    "decode_step": decode_step_reference,
    "evict": evict_reference,
    "prefill_scores": prefill_scores_reference,
}
_KERNELS: dict[tuple[str, str], Callable] = {}


def register(name: str, device_type: str, fn: Callable) -> None:
    """Make ``fn`` the ``device_type`` kernel of op ``name``."""
    OPS[name].register_kernel(device_type)(fn)
    _KERNELS[(name, device_type)] = fn


Route = Literal["kernel", "reference", "dispatcher"]


def call(name: str, *args, route: Route = "kernel"):
    """Run op ``name``: as a graph node while compiling; otherwise directly on its device's kernel, on the
    plain-PyTorch reference (``route="reference"``, for checks) or through the dispatcher (to measure it)."""
    if torch.compiler.is_compiling() or route == "dispatcher":
        return getattr(torch.ops.momentkv, name).default(*args)
    if route == "reference":
        return REFERENCES[name](*args)
    return _KERNELS.get((name, args[0].device.type), REFERENCES[name])(*args)
