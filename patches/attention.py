"""The attention function momentkv registers with transformers' ``AttentionInterface``.

One function for every model that dispatches through ``ALL_ATTENTION_FUNCTIONS``. It routes and checks:
the prompt, sliding-window layers and any call made outside a momentkv generation go to the model's own
attention; a budgeted layer scores its prompt after it and decodes through its own ``decode``.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import BudgetedLayer, MomentKVCache
from .support import UnsupportedAttention


def key_validity(attention_mask: Tensor | None, key: Tensor) -> Tensor:
    """Which prompt keys are real tokens: the last query row of the causal prompt mask sees exactly those."""
    batch, length = key.shape[0], key.shape[-2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=key.device)
    last_row = attention_mask[:, 0, -1, :length]
    allowed = last_row if last_row.dtype == torch.bool else last_row == 0
    return allowed.expand(batch, length)


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
# what the decode op computes (``s_aux``, learned sinks, and ``softcap`` are computed). A budgeted layer refuses them
# (``position_bias``: Inkling's relative position bias, added to the scores).
UNSUPPORTED_KWARGS = ("sliding_window", "attention_chunk_size", "position_bias")


def _check_decode_call(layer: BudgetedLayer, module, key: Tensor, value: Tensor, kwargs: dict) -> None:
    """Refuse, before any token is produced, what the decode step cannot reproduce exactly: keys or values
    that are not this layer's cache (the model transforms them after the cache update, calls attention twice
    per layer, or reads another layer's cache), or arguments that change the attention's maths."""
    if not layer.unattended or key is not layer.keys or value is not layer.values:
        raise UnsupportedAttention(
            f"momentkv cannot budget {_where(module)}: its attention reads keys or values other than the cache's own "
            "(not the buffers its cache layer returned for the new token: transformed after the cache update, "
            "read twice, or read at another layer's index), so the budgeted decode step would not compute the "
            "model's attention")
    for name in UNSUPPORTED_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
            raise UnsupportedAttention(f"momentkv cannot budget {_where(module)}: its attention uses {name} "
                                       f"({shown}), which the budgeted decode step does not apply")


def _check_prompt_mask(module, attention_mask: Tensor | None) -> None:
    """Refuse a mask that carries a bias (ALiBi, a relative position bias): the model's own attention adds it to the
    scores, the budgeted decode step reads only which slots are valid. Checked once per layer and generation."""
    if attention_mask is None or not attention_mask.is_floating_point():
        return
    masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    if bool(((attention_mask != 0) & ~masked).any()):
        raise UnsupportedAttention(f"momentkv cannot budget {_where(module)}: its attention mask carries a bias "
                                   "(ALiBi or a relative position bias), which the budgeted decode step does not apply")


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
        softcap = kwargs.get("softcap") or 0.0
        if not layer.prefilled:
            if dropout:
                raise ValueError(f"momentkv cannot generate with attention dropout ({dropout}, {_where(module)} is in "
                                 "training mode): the budgeted decode step has none, so the prompt and the decode "
                                 "steps would differ; call model.eval() before generate")
            if not torch.compiler.is_compiling():  # a host sync: eager prefill only (the trial always runs it)
                _check_prompt_mask(module, attention_mask)
            result = fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
            layer.prefill(query, key_validity(attention_mask, key), scale, softcap)
            return result
        if not torch.compiler.is_compiling():
            _check_decode_call(layer, module, key, value, kwargs)
        return layer.decode(query, scale, kwargs.get("s_aux"), softcap), None

    return momentkv_attention
