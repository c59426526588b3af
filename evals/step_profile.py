"""Where a momentkv decode step's time goes: attention (with the fused momentum update), eviction,
the cache write, and the rest of the model.

After a real generation, each component is timed at the cache's real shapes (median of many
calls; attention and eviction on copies of its buffers, the cache write on the cache itself, which
is done with), times the number of budgeted layers; the rest is the measured step time minus those.
"""

from __future__ import annotations

import os
import time
from statistics import median
from typing import Any, Callable

import torch
from transformers import StoppingCriteriaList

import momentkv
from momentkv.ops.kernels import kernel

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


def profile_step(model, prompt_len: int, new_tokens: int, budget: int, batch: int = 1) -> dict[str, Any]:
    device = model.device
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with momentkv.patched(model, budget=budget):
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
        timer = StepTimer(device)
        model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, stopping_criteria=StoppingCriteriaList([timer]))
        cache = momentkv.state_of(model).cache
        layers = cache.budgeted_layers
        layer = layers[0]
        cfg = layer.config
        heads = model.config.num_attention_heads
        query = torch.randn(batch, heads, layer.keys.shape[-1], dtype=layer.dtype, device=device)
        state = {name: getattr(layer, name).clone() for name in layer.BUFFERS}
        moments = (state["n"], state["mu_k"], state["mu_v"], state["comoment"])
        attend, evict = kernel("decode_attention", device), kernel("evict", device)
        scale = layer.keys.shape[-1] ** -0.5
        attention_us = _time_us(lambda: attend(query, state["keys"], state["values"], state["valid"], *moments,
                                               state["importance"], state["normalizer"], scale, cfg.alpha,
                                               cfg.corrected, cfg.moment_weight, None, state["value_range"]), device)
        evict_us = _time_us(lambda: evict(state["keys"], state["values"], state["valid"].clone(), state["evictable"],
                                          state["importance"], state["normalizer"], state["positions"], *moments,
                                          state["free_slot"], state["decode_len"], state["seen"], cfg.budget,
                                          cfg.policy_id, cfg.bias_correction, cfg.recent_window, cfg.window_share,
                                          cfg.scope == "layer", cfg.seed, cfg.corrected, state["value_range"]), device)
        clone_us = _time_us(lambda: state["valid"].clone(), device)
        # The same attention through torch's dispatcher (what a compiled graph calls), for its overhead.
        dispatched_us = _time_us(lambda: torch.ops.momentkv.decode_attention.default(
            query, state["keys"], state["values"], state["valid"], *moments, state["importance"],
            state["normalizer"], scale, cfg.alpha, cfg.corrected, cfg.moment_weight, None, state["value_range"]),
            device)
        k_new = torch.randn(batch, layer.num_heads, 1, layer.keys.shape[-1], dtype=layer.dtype, device=device)
        update_us = _time_us(lambda: layer.update(k_new, k_new), device)
    step_ms = timer.summary(batch)["step_ms_median"]
    per_layer = {"attention_and_momentum": attention_us, "eviction": evict_us - clone_us, "cache_write": update_us}
    split = {name: us * len(layers) / 1e3 for name, us in per_layer.items()}
    split["rest_of_model"] = step_ms - sum(split.values())
    return dict(step_ms=step_ms, budgeted_layers=len(layers), per_layer_us=per_layer, split_ms=split,
                attention_through_dispatcher_us=dispatched_us, cpu_kernel=os.environ.get("MOMENTKV_CPU_KERNEL", "fused"),
                split_fraction={k: v / step_ms for k, v in split.items()}, budget=budget, prompt_len=prompt_len,
                new_tokens=new_tokens, batch=batch, device=str(device))
