"""Which kernel each op runs on each device, so eager code can call it without the dispatcher.

Going through torch's dispatcher added ~90 us to a ~110 us fused CPU attention call
(results/profile-step-cpu.json); :func:`call` therefore runs the kernel directly in eager mode and
the op itself (an opaque graph node) under ``torch.compile``. Registering here registers with
torch.library too, so both paths always run the same code.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from .attention import decode_attention, decode_attention_reference
from .eviction import evict, evict_reference
from .signature import by_name, named, positional
from .state import LayerState, StepSettings
from .step import decode_step, decode_step_reference, write, write_reference

# The decode ops (all over the parameters of ``ops/signature.py``) and their plain-PyTorch references (by name).
OPS = {"write": write, "decode_attention": decode_attention, "evict": evict, "decode_step": decode_step}
REFERENCES = {"write": write_reference, "decode_attention": decode_attention_reference, "evict": evict_reference,
              "decode_step": decode_step_reference}
_KERNELS: dict[tuple[str, str], Callable] = {}


def register(name: str, device_type: str, kernel: Callable) -> None:
    """Make ``kernel`` (taking the decode parameters in the schema's order) the ``device_type`` kernel of op
    ``name``."""
    OPS[name].register_kernel(device_type)(kernel)
    _KERNELS[(name, device_type)] = kernel


def registered() -> list[tuple[str, str]]:
    """(op, device type) of every kernel registered besides the references, sorted."""
    return sorted(_KERNELS)


Route = Literal["kernel", "reference", "dispatcher"]
# Traced into a compiled graph rather than called as an opaque op: a few indexing ops (``index_put_``, done in
# place) that inductor fuses with the rest, where an op call would add the dispatcher's cost every layer and step.
TRACED_WHEN_COMPILING = ("write",)
_REFERENCE_KERNELS = {name: by_name(body) for name, body in REFERENCES.items()}


def call(name: str, state: LayerState, settings: StepSettings, route: Route = "kernel", **per_call: Any):
    """Run decode op ``name`` on a layer's ``state`` and ``settings`` (``per_call``: the token, scale, sink logits,
    rank, or a replacement for a state tensor or a setting): as a graph node while compiling (the write traced
    in, :data:`TRACED_WHEN_COMPILING`); otherwise directly
    on its device's kernel, on the plain-PyTorch reference (``route="reference"``, for checks) or through the
    dispatcher (to measure it)."""
    values = named(state, settings, **per_call)
    if name in TRACED_WHEN_COMPILING and torch.compiler.is_compiling():
        return REFERENCES[name](**values)
    args = positional(values)
    if torch.compiler.is_compiling() or route == "dispatcher":
        return getattr(torch.ops.momentkv, name).default(*args)
    if route == "reference":
        return _REFERENCE_KERNELS[name](*args)
    return _KERNELS.get((name, state.keys.device.type), _REFERENCE_KERNELS[name])(*args)
