"""The attention function momentkv registers with transformers' ``AttentionInterface``.

One function for every model that dispatches through ``ALL_ATTENTION_FUNCTIONS``:
budgeted layers decode through the momentkv ops; the prompt, sliding-window layers
and any call made outside a momentkv generation go to the model's own attention.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


from momentkv.ops.kernels import call

from .cache import BudgetedLayer, MomentKVCache


def key_validity(attention_mask: Tensor | None, key: Tensor) -> Tensor:
    """Which prompt keys are real tokens: the last query row of the causal prompt mask sees exactly those."""
    batch, length = key.shape[0], key.shape[-2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=key.device)
    last_row = attention_mask[:, 0, -1, :length]
    allowed = last_row if last_row.dtype == torch.bool else last_row == 0
    return allowed.expand(batch, length)


def decode_step(layer: BudgetedLayer, query: Tensor, scale: float) -> Tensor:
    """Attention of one new token over a budgeted layer, then eviction if over budget. Returns [B, 1, Hq, Dv]."""
    cfg = layer.config
    moments = (layer.n, layer.mu_k, layer.mu_v, layer.comoment)
    out = call("decode_attention", query[:, :, 0], layer.keys, layer.values, layer.valid, *moments,
               layer.importance, layer.normalizer, scale, cfg.alpha, cfg.corrected,
               cfg.moment_weight)
    call("evict", layer.keys, layer.values, layer.valid, layer.evictable, layer.importance, layer.normalizer,
         layer.positions, *moments, layer.free_slot, layer.decode_len, layer.seen, cfg.budget, cfg.policy_id,
         cfg.bias_correction, cfg.recent_window, cfg.window_share, cfg.scope == "layer", cfg.seed, cfg.corrected)
    return out.unsqueeze(1)


def make_attention(active_cache: Callable[[], MomentKVCache | None], fallback: Callable) -> Callable:
    """Build the attention function of one patched model; ``active_cache`` returns the cache of the
    generation in progress (None outside one), ``fallback`` is the model's own attention function."""

    def momentkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        cache = active_cache()
        layer = cache.layers[module.layer_idx] if cache is not None else None
        if not isinstance(layer, BudgetedLayer):
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if not layer.prefilled:
            result = fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
            cache.finish_prefill(layer, query, key_validity(attention_mask, key), scale)
            return result
        return decode_step(layer, query, scale), None

    return momentkv_attention
