"""The attention function momentkv registers with transformers' ``AttentionInterface``.

One function for every model that dispatches through ``ALL_ATTENTION_FUNCTIONS``:
budgeted layers decode through the momentkv ops; the prompt, sliding-window layers
and any call made outside a momentkv generation go to the model's own attention.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from momentkv.ops.layer import attend, evict, step, write
from momentkv.ops.selection import eviction_rank

from .cache import BudgetedLayer, MomentKVCache
from .parallel import ONE_PROCESS, HeadGroup
from .support import UnsupportedAttention


def key_validity(attention_mask: Tensor | None, key: Tensor) -> Tensor:
    """Which prompt keys are real tokens: the last query row of the causal prompt mask sees exactly those."""
    batch, length = key.shape[0], key.shape[-2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=key.device)
    last_row = attention_mask[:, 0, -1, :length]
    allowed = last_row if last_row.dtype == torch.bool else last_row == 0
    return allowed.expand(batch, length)


def decode_step(layer: BudgetedLayer, query: Tensor, key: Tensor, value: Tensor, scale: float,
                sinks: Tensor | None = None, heads: HeadGroup = ONE_PROCESS) -> Tensor:
    """The new token (query [B, Hq, 1, Dk], key, value [B, H, 1, D]) written into a budgeted layer, its attention
    over the layer, then eviction if over budget: one op. Returns [B, 1, Hq, Dv].

    sinks [Hq]: the model's learned attention-sink logits, if it has them. heads: the tensor-parallel ranks
    holding the layer's other KV heads; a layer-scope victim is chosen over all of them, so that step is
    split around the collective (write, attend, rank, evict)."""
    state, settings = layer.state, layer.step_settings
    if not (settings["shared"] and heads.size > 1):
        return step(state, query[:, :, 0], key, value, scale=scale, sinks=sinks, **settings).unsqueeze(1)
    attention = {name: settings[name] for name in ("alpha", "corrected", "moment_weight")}
    rule = {name: settings[name] for name in ("policy", "bias_correction", "recent_window", "cap_window", "shared",
                                              "seed")}
    write(state, key, value, budget=settings["budget"])
    out = attend(state, query[:, :, 0], scale=scale, sinks=sinks, **attention)
    rank = eviction_rank(importance=state.importance, normalizer=state.normalizer, positions=state.positions,
                         valid=state.valid, evictable=state.evictable, seen=state.seen, draw=state.decode_len,
                         combine=heads.combine, ranks=heads.size, **rule)
    evict(state, budget=settings["budget"], fold=settings["fold"], rank=rank, **rule)
    return out.unsqueeze(1)


def own_attention(implementation: str) -> Callable:
    """The attention function a model runs under ``implementation``: a registered one, or, for
    "eager", the one its modeling module defines (``eager_attention_forward``: transformers' convention,
    which also carries a model's own extras, such as gpt-oss's sinks, that SDPA would drop)."""
    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    eager: dict[type, Callable] = {}

    def module_eager_attention(module, *args, **kwargs):
        kind = type(module)
        if kind not in eager:
            eager[kind] = getattr(sys.modules[kind.__module__], "eager_attention_forward")
        return eager[kind](module, *args, **kwargs)

    return module_eager_attention


# Keyword arguments of the attention interface that change the maths of a full-attention layer beyond
# what the decode op computes (``s_aux``, learned sinks, is computed). A budgeted layer refuses them.
UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "attention_chunk_size")


def _check_decode_call(layer: BudgetedLayer, module, key: Tensor, value: Tensor, kwargs: dict) -> None:
    """Refuse, before any token is produced, what the decode op cannot reproduce exactly: keys or values
    that are not the token this layer's cache just received (the model transforms them after the cache, or
    calls attention twice per layer, or reads another layer's cache), or arguments that change the attention's
    maths. Marks the token as taken: the next ``update`` refuses a token that never got here."""
    incoming, layer.incoming = layer.incoming, None
    if incoming is None or key is not incoming[0] or value is not incoming[1]:
        raise UnsupportedAttention(
            f"momentkv cannot budget {_where(module)}: its attention reads keys or values other than the cache's own "
            "(not the new token its cache layer received: transformed after the cache update, or read at another "
            "layer's index), so the budgeted decode step would not compute the model's attention")
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise UnsupportedAttention(f"momentkv cannot budget {_where(module)}: its attention uses "
                                       f"{name}={kwargs[name]!r}")


def _where(module) -> str:
    kind = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
    return f"layer {module.layer_idx} of model type {kind!r}"


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
        if not torch.compiler.is_compiling():
            _check_decode_call(layer, module, key, value, kwargs)
        return decode_step(layer, query, key, value, scale, kwargs.get("s_aux"), cache.heads), None

    return momentkv_attention
