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
from .signature import NAMES, by_name, named, positional
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
# Traced into a compiled graph rather than called as an opaque op: the write everywhere (a few indexing ops,
# ``index_put_``, done in place), and the whole step on the CPU, whose kernel is this same reference compiled by
# inductor: in the model's graph inductor fuses it with the rest, where an op call adds the dispatcher's cost
# (~90 us on CPU) every layer and step. On CUDA the step's Triton kernel stays one node of the graph. The step
# split around a registered rule stays ops: traced, torch 2.11's inductor gave other tokens than eager after
# the first eviction (a tiny Llama, KeyDiff, fp32; 2.13 the same tokens).
TRACED_WHEN_COMPILING = ("write",)
TRACED_ON_CPU = ("decode_step",)


def _traced(name: str, state: LayerState) -> bool:
    return name in TRACED_WHEN_COMPILING or (name in TRACED_ON_CPU and state.keys.is_cpu)
_REFERENCE_KERNELS = {name: by_name(body) for name, body in REFERENCES.items()}


def call(name: str, state: LayerState, settings: StepSettings, route: Route = "kernel", **per_call: Any):
    """Run decode op ``name`` on a layer's ``state`` and ``settings`` (``per_call``: the token, scale, sink logits,
    rank, or a replacement for a state tensor or a setting): while compiling, traced in (the write, and the step on
    the CPU: :func:`_traced`) or as a graph node; otherwise directly on its device's kernel, on the plain-PyTorch
    reference (``route="reference"``, for checks) or through the dispatcher (to measure it)."""
    values = named(state, settings, **per_call)
    if torch.compiler.is_compiling() and _traced(name, state):
        return REFERENCES[name](**values)
    args = positional(values)
    if torch.compiler.is_compiling() or route == "dispatcher":
        return getattr(torch.ops.momentkv, name).default(*args)
    if route == "reference":
        return _REFERENCE_KERNELS[name](*args)
    return _kernel(name, state)(*args)


def _kernel(name: str, state: LayerState) -> Callable:
    return _KERNELS.get((name, state.keys.device.type), _REFERENCE_KERNELS[name])


def layout_of(argument: Any) -> Any:
    """What a compiled kernel is specialised on in one argument: a tensor's shape, strides, dtype and whether it
    is on the CPU; any other value itself."""
    if isinstance(argument, torch.Tensor):
        return argument.shape, argument.stride(), argument.dtype, argument.is_cpu
    return argument


_INDEX = {name: index for index, name in enumerate(NAMES)}


def bind(name: str, state: LayerState, settings: StepSettings) -> Callable[..., Any]:
    """Decode op ``name`` on one layer's ``state`` and ``settings``, called with the per-call arguments alone, as
    :func:`call` runs it. A layer calls its op every token, and its state's tensors and its settings never change:
    their positions and layouts are found once here, not per call (~15 us a call on CPU, a tenth of the step)."""
    fixed = list(positional(named(state, settings)))
    kernel = _kernel(name, state)
    run = getattr(kernel, "run", None)  # a kernel told its arguments' layout (``ops/cpu.py``'s fused kernels)
    fixed_layout = [layout_of(argument) for argument in fixed] if run else []

    def bound(**per_call: Any):
        if torch.compiler.is_compiling():
            return call(name, state, settings, **per_call)
        args, layout = fixed.copy(), fixed_layout.copy()
        for key, value in per_call.items():
            index = _INDEX.get(key)
            if index is None:
                raise TypeError(f"not a decode-op parameter: {key}")
            args[index] = value
            if run:
                layout[index] = layout_of(value)
        return run(args, tuple(layout)) if run else kernel(*args)

    return bound
