"""CPU kernels: the plain-PyTorch reference bodies, fused into C++ loops by inductor.

A decode step is one op per layer (``decode_step``: write, attend, evict); eagerly it is ~70 small aten calls,
which on CPU cost more than the attention itself. Compiled once per shape (and cached on disk by
inductor), it runs 3-5x faster. ``MOMENTKV_CPU_KERNEL=reference`` keeps the eager bodies;
a machine where inductor cannot compile falls back to them with a warning.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any, Callable

import torch

from .kernels import REFERENCES, layout_of, register
from .signature import by_name


# Inductor (torch 2.13) fails on some shapes of the defaults' step (moments kept, window capped): its C++
# outer-loop fusion with a local buffer reads the in-place update of the score as a load (``KeyError: 'buf11'``),
# and every step fell back to the eager body. Such a graph is compiled again with horizontal fusion off.
RETRY_OPTIONS = {"cpp.max_horizontal_fusion_size": 1}

# A loop is split over threads only where aten would split it (its grain, at::internal::GRAIN_SIZE elements).
# Inductor's default (512) split a batch-1 step's small head loops into 9-14 worksharing loops a layer, each ending
# in a barrier, a wait for the other thread's time slice when other processes share the cores; beside 4 busy
# processes, in one interleaved comparison, the mean step was 3.7x the full cache's with that split and 1.4x with
# this one (docs/results.md, "Under load": single runs still collapse, for a cause not yet found).
# Inductor's own check of each input's size and strides is left out: the kernel is looked up by them (_signature).
OPTIONS = {"cpp.min_chunk_size": 32768, "size_asserts": False}


def _signature(layout: tuple) -> tuple:
    """What a compiled kernel is specialised on: its arguments' ``layout`` (``kernels.layout_of``: the non-tensor
    arguments, each tensor's layout), the modes (grad, inference, autocast) it was traced under, the checks
    dynamo's guards would make on each call, and the threads it may use (inductor writes the count into the C++
    unless it is the machine's core count)."""
    modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")
    return layout, modes, torch.get_num_threads()


def _compile(reference: Callable, args: tuple) -> tuple[Callable, Any]:
    """Compile ``reference`` for ``args`` (running it once on them); returns the compiled kernel and that output.

    Dynamo traces it (a fresh code object each time, so no recompile cap is shared) and inductor compiles the
    graph; later calls go straight to inductor's graph, which skips dynamo's frame evaluation and guards:
    ~70 us a call on a cold CPU cache, more than the kernel itself (results/profile-step-cpu.json). The
    caller checks what the guards would have (:func:`_signature`)."""
    graph: dict[str, Any] = {}

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graph["compiled"], graph["inputs"] = torch._inductor.compile(gm, example_inputs), list(example_inputs)
        return graph["compiled"]

    def traced() -> Callable:
        copy = types.FunctionType(reference.__code__.replace(), reference.__globals__, reference.__name__,
                                  reference.__defaults__, reference.__closure__)
        return torch.compile(copy, backend=backend, dynamic=False, fullgraph=True)

    run = traced()
    try:
        with torch._inductor.config.patch(OPTIONS):
            out = run(*args)  # inductor fails while compiling, before the graph runs: nothing is mutated yet
    except torch._inductor.exc.InductorError:  # see RETRY_OPTIONS
        with torch._inductor.config.patch({**OPTIONS, **RETRY_OPTIONS}):
            run = traced()
            out = run(*args)
    positions = [next((i for i, a in enumerate(args) if a is each), None) for each in graph["inputs"]]
    if None in positions or not (out is None or isinstance(out, torch.Tensor)):
        return run, out  # the graph reads something besides the arguments: keep dynamo's own call
    compiled = graph["compiled"]

    def kernel(*call_args):
        outputs = compiled(*(call_args[i] for i in positions))
        return None if out is None else outputs[0]

    return kernel, out


def _fused(reference: Callable) -> Callable:
    """The fused CPU kernel of an op: ``reference`` compiled once per :func:`_signature` of its arguments. Its
    ``run(args, layout)`` takes the arguments' layout found by the caller (``kernels.bind``)."""
    compiled: dict[tuple, Callable] = {}
    state = {"fused": True}

    def kernel(*args):
        return run(args, tuple([layout_of(argument) for argument in args]))

    def run(args, layout: tuple):
        if not state["fused"]:
            return reference(*args)
        key = _signature(layout)
        try:
            if key in compiled:
                return compiled[key](*args)
            compiled[key], out = _compile(reference, args)
            return out
        except Exception as error:  # no C++ toolchain, or an inductor bug: stay correct, get slower
            warnings.warn(f"momentkv: fused CPU kernel unavailable ({type(error).__name__}: {error}); "
                          "using the eager reference", RuntimeWarning, stacklevel=2)
            state["fused"] = False
            return reference(*args)

    kernel.run = run
    return kernel


def register_fused_cpu_kernels() -> bool:
    """Register the fused CPU kernels unless ``MOMENTKV_CPU_KERNEL=reference``; returns whether it did."""
    choice = os.environ.get("MOMENTKV_CPU_KERNEL", "fused")
    if choice not in ("fused", "reference"):
        raise ValueError(f"MOMENTKV_CPU_KERNEL must be 'fused' or 'reference', got {choice!r}")
    if choice == "reference":
        return False
    for name, reference in REFERENCES.items():  # attention and eviction alone: the step split around a collective
        register(name, "cpu", _fused(by_name(reference)))
    return True
