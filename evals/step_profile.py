"""Where a momentkv decode step's time goes, in the generation and kernel by kernel.

In the generation: the same greedy generation timed as it is, with each layer's decode step replaced by a
no-op (what remains is the rest of the model, hooks included), and with transformers' dynamic full cache;
the difference is what the budgeted layers cost in place, cold caches and all. Kernel by kernel: after the
generation, the one-op step (``decode_step``) and its parts (attention with the momentum update, eviction,
cache write) are timed at the cache's real shapes on copies of its buffers (median of many warm calls).
"""

from __future__ import annotations

import os
import time
from statistics import median
from typing import Any, Callable
from unittest import mock

import torch
from transformers import StoppingCriteriaList

import momentkv
from momentkv.ops.layer import attend, evict, step, write
from momentkv.patches import attention as attention_module

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


def _no_step(state, query, key, value, **settings):
    return torch.zeros_like(query)


def profile_step(model, prompt_len: int, new_tokens: int, budget: int, batch: int = 1) -> dict[str, Any]:
    device = model.device
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with momentkv.patched(model, budget=budget):
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
        full_ms = _generation_step_ms(model, ids, new_tokens, full_cache=True)
        with mock.patch.object(attention_module, "step", _no_step):
            without_ms = _generation_step_ms(model, ids, new_tokens)
        step_ms = _generation_step_ms(model, ids, new_tokens)
        cache = momentkv.state_of(model).cache
        layers = cache.budgeted_layers
        layer = layers[0]
        cfg = layer.config
        heads = model.config.num_attention_heads
        dim = layer.keys.shape[-1]
        query = torch.randn(batch, heads, dim, dtype=layer.dtype, device=device)
        token = torch.randn(batch, layer.num_heads, 1, dim, dtype=layer.dtype, device=device)
        attention = dict(scale=dim ** -0.5, alpha=cfg.alpha, corrected=cfg.corrected, moment_weight=cfg.moment_weight,
                         sinks=None)
        rule = dict(budget=cfg.budget, policy=cfg.policy_id, bias_correction=cfg.bias_correction,
                    recent_window=cfg.recent_window, cap_window=cfg.cap_window, shared=cfg.scope == "layer",
                    seed=cfg.seed, fold=cfg.corrected)
        state = layer.state.clone()
        start = state.clone()

        def restored(fn: Callable[[], Any]) -> Callable[[], Any]:  # each call on the state the generation left
            def call():
                for mine, original in zip(state.tensors(), start.tensors()):
                    mine.copy_(original)
                fn()
            return call

        restore_us = _time_us(restored(lambda: None), device)
        kernels = {
            "decode_step": lambda: step(state, query, token, token, **attention, **rule),
            "attention_and_momentum": lambda: attend(state, query, **attention),
            "eviction": lambda: evict(state, **rule),
            "cache_write": lambda: write(state, token, token, budget=cfg.budget),
        }
        per_layer = {name: _time_us(restored(fn), device) - restore_us for name, fn in kernels.items()}
        # The step through torch's dispatcher (what a compiled graph calls), for its overhead.
        dispatched_us = _time_us(restored(lambda: step(state, query, token, token, **attention, **rule,
                                                       route="dispatcher")), device) - restore_us
    in_generation_us = 1e3 * (step_ms - without_ms) / len(layers)
    return dict(step_ms=step_ms, step_ms_without_budgeted_attention=without_ms, full_dynamic_step_ms=full_ms,
                budgeted_layers=len(layers), step_per_layer_in_generation_us=in_generation_us,
                per_layer_warm_us=per_layer, step_through_dispatcher_us=dispatched_us,
                cpu_kernel=os.environ.get("MOMENTKV_CPU_KERNEL", "fused"), budget=budget, prompt_len=prompt_len,
                new_tokens=new_tokens, batch=batch, device=str(device))
