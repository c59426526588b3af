"""Where a momentkv decode step's time goes, in the generation and kernel by kernel.

In the generation: the same greedy generation timed with the budgeted cache and with transformers' dynamic
full cache; the difference per budgeted layer is what momentkv adds (or saves) in place, cold caches and all.
Kernel by kernel: after the generation, a layer's decode op (``decode_step``: write, attend, evict; called as the
layer calls it) and its parts (the write, attention with the momentum update, eviction) are timed at the cache's
real shapes on copies of its buffers (median of many warm calls), and the step once more through torch's
dispatcher (what a compiled graph calls). Only public entry points: ``momentkv.patched``, ``state_of``,
``ops.call`` and ``ops.kernels.bind``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from statistics import median
from typing import Any, Callable

import torch
from transformers import StoppingCriteriaList

import momentkv
from momentkv.ops import call
from momentkv.ops.kernels import bind

from .step_timer import StepTimer


def _time_us(fn: Callable[[], Any], device: torch.device, repeats: int = 200) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return median(samples) * 1e6


def _generation_step_ms(model, ids, new_tokens: int, full_cache: bool = False) -> float:
    timer = StepTimer(model.device)
    generate = type(model).generate.__get__(model) if full_cache else model.generate
    generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([timer]))
    return timer.summary(ids.shape[0])["step_ms_median"]


def profile_step(model, prompt_len: int, new_tokens: int, budget: int, batch: int = 1) -> dict[str, Any]:
    device = model.device
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with momentkv.patched(model, budget=budget):
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
        full_ms = _generation_step_ms(model, ids, new_tokens, full_cache=True)
        step_ms = _generation_step_ms(model, ids, new_tokens)
        layers = momentkv.state_of(model).cache.budgeted_layers
        layer = layers[0]
        dim = layer.keys.shape[-1]
        query = torch.randn(batch, model.config.num_attention_heads, dim, dtype=layer.dtype, device=device)
        token = torch.randn(batch, layer.num_heads, 1, dim, dtype=layer.dtype, device=device)
        state, settings = layer.state.clone(), layer.settings
        start = state.clone()

        def restored(fn: Callable[[], Any]) -> Callable[[], Any]:  # each call on the state the generation left
            def run():
                for mine, original in zip(state.tensors(), start.tensors()):
                    mine.copy_(original)
                fn()
            return run

        attend = dict(query=query, scale=dim ** -0.5)
        step = bind("decode_step", state, settings)  # as the layer calls it
        kernels = {
            "write": lambda: call("write", state, settings, key=token, value=token),
            "decode_step": lambda: step(key=token, value=token, **attend),
            "attention_and_momentum": lambda: call("decode_attention", state, settings, **attend),
            "eviction": lambda: call("evict", state, settings),
        }
        restore_us = _time_us(restored(lambda: None), device)
        per_layer = {name: _time_us(restored(fn), device) - restore_us for name, fn in kernels.items()}
        dispatched_us = _time_us(restored(lambda: call("decode_step", state, settings, route="dispatcher", key=token,
                                                       value=token, **attend)), device) - restore_us
    return dict(step_ms=step_ms, full_dynamic_step_ms=full_ms, budgeted_layers=len(layers),
                added_per_layer_over_full_cache_us=1e3 * (step_ms - full_ms) / len(layers),
                per_layer_warm_us=per_layer, step_through_dispatcher_us=dispatched_us,
                cpu_kernel=os.environ.get("MOMENTKV_CPU_KERNEL", "fused"), budget=budget, prompt_len=prompt_len,
                new_tokens=new_tokens, batch=batch, device=str(device))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv profile-step``'s options."""
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "llama-3.1-8b-random"],
                        help="as for bench")
    parser.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when available")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (random ids)")
    parser.add_argument("--new-tokens", type=int, default=256, help="generated tokens timed")
    parser.add_argument("--budget", type=int, default=64, help="momentkv budget")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--out", default=None, help="write the split as JSON to this file")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv profile-step``: returns the exit code."""
    from .models import bench_model

    model, _ = bench_model(args.model, args.device)
    result = profile_step(model, args.prompt_len, args.new_tokens, args.budget, args.batch)
    print(f"step {result['step_ms']:.2f} ms with {result['budgeted_layers']} budgeted layers, "
          f"{result['full_dynamic_step_ms']:.2f} ms with the dynamic full cache: "
          f"{result['added_per_layer_over_full_cache_us']:+.0f} us per budgeted layer over the full cache")
    print(f"per layer, warm ({result['cpu_kernel']} CPU kernels; the step through the dispatcher "
          f"{result['step_through_dispatcher_us']:.0f} us):")
    for name, us in result["per_layer_warm_us"].items():
        print(f"  {name:24s} {us:8.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
