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
from momentkv.ops.layer import attend, evict

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
        state = layer.state.clone()
        scale = layer.keys.shape[-1] ** -0.5
        attention = dict(scale=scale, alpha=cfg.alpha, corrected=cfg.corrected, moment_weight=cfg.moment_weight)
        attention_us = _time_us(lambda: attend(state, query, **attention), device)
        eviction = dict(budget=cfg.budget, policy=cfg.policy_id, bias_correction=cfg.bias_correction,
                        recent_window=cfg.recent_window, cap_window=cfg.cap_window, shared=cfg.scope == "layer",
                        seed=cfg.seed, fold=cfg.corrected)
        valid = state.valid.clone()

        def evict_once() -> None:  # on the same buffers each time: restore the slot the last call freed
            state.valid.copy_(valid)
            evict(state, **eviction)

        evict_us = _time_us(evict_once, device)
        restore_us = _time_us(lambda: state.valid.copy_(valid), device)
        # The same attention through torch's dispatcher (what a compiled graph calls), for its overhead.
        dispatched_us = _time_us(lambda: attend(state, query, **attention, route="dispatcher"), device)
        k_new = torch.randn(batch, layer.num_heads, 1, layer.keys.shape[-1], dtype=layer.dtype, device=device)
        update_us = _time_us(lambda: layer.update(k_new, k_new), device)
    step_ms = timer.summary(batch)["step_ms_median"]
    per_layer = {"attention_and_momentum": attention_us, "eviction": evict_us - restore_us, "cache_write": update_us}
    split = {name: us * len(layers) / 1e3 for name, us in per_layer.items()}
    split["rest_of_model"] = step_ms - sum(split.values())
    return dict(step_ms=step_ms, budgeted_layers=len(layers), per_layer_us=per_layer, split_ms=split,
                attention_through_dispatcher_us=dispatched_us, cpu_kernel=os.environ.get("MOMENTKV_CPU_KERNEL", "fused"),
                split_fraction={k: v / step_ms for k, v in split.items()}, budget=budget, prompt_len=prompt_len,
                new_tokens=new_tokens, batch=batch, device=str(device))
