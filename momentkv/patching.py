"""``momentkv.patch(model, budget=...)``: one line turns a model's ``generate()`` into budgeted decoding.

Only the model given is touched: its attention implementation name, and an instance-level
``generate``. ``unpatch`` restores both; the weights are never modified.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedModel
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from momentkv.config import MomentKVConfig
from momentkv.patches import MomentKVCache, make_attention

_ATTR = "_momentkv"
_names = itertools.count()
# Per model, the state of each configuration it was patched with: patching again with the same
# configuration registers the same attention function under the same name, so a compiled decode
# step is reused instead of recompiled (a compiled graph guards on that function).
_REUSABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class PatchState:
    """What ``patch`` changed on one model, and the cache it reuses across generations."""

    config: MomentKVConfig
    name: str
    original_attention: str
    compile: bool | None
    mask: Callable = field(repr=False)
    attention: Callable | None = field(default=None, repr=False)
    cache: MomentKVCache | None = None
    active: MomentKVCache | None = field(default=None, repr=False)


def _check_supported(model: Any) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"momentkv cannot patch model type {model_type!r}: its attention does not go through transformers' "
            "attention interface (supported: Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma, Gemma3 and other models "
            "whose modeling code dispatches through ALL_ATTENTION_FUNCTIONS)"
        )
    if getattr(model.config.get_text_config(decoder=True), "attn_logit_softcapping", None) is not None:
        raise ValueError(f"momentkv does not support attention logit soft-capping (model type {model_type!r})")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("model has parameters on the meta device; load or materialise its weights before patching")
    if hasattr(model, _ATTR):
        raise ValueError("model is already patched by momentkv; call momentkv.unpatch(model) first")


def patch(model: PreTrainedModel, budget: int | None = None, *, compile: bool | None = None,
          config: MomentKVConfig | None = None, **options: Any) -> PreTrainedModel:
    """Give ``model.generate`` a budgeted KV cache; returns the same model.

    budget: decode slots per layer and KV head (see :class:`MomentKVConfig` for ``options``).
    compile: None follows transformers (auto-compiles the decode step on CUDA), True compiles
        the decode step with ``fullgraph=True`` on any device, False never compiles.
    """
    _check_supported(model)
    if config is None:
        if budget is None:
            raise TypeError("patch() needs budget=... (an int >= 1) or config=MomentKVConfig(...)")
        config = MomentKVConfig(budget=budget, **options)
    elif budget is not None or options:
        raise TypeError("pass either config=... or budget=... with options, not both")
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be None, True or False, got {compile!r}")
    context = _context_length(model)
    if context is not None and config.budget > context:
        raise ValueError(f"budget must be an int in [1, {context}] (the model's context), got {config.budget}")

    original = model.config._attn_implementation
    states = _REUSABLE.setdefault(model, {})
    state = states.get((config, original))
    if state is None:
        fallback = ALL_ATTENTION_FUNCTIONS[original] if original in ALL_ATTENTION_FUNCTIONS else sdpa_attention_forward
        mask = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask
        state = PatchState(config=config, name=f"momentkv_{next(_names)}", original_attention=original,
                           compile=compile, mask=mask)
        state.attention = make_attention(lambda: state.active, fallback)
        states[(config, original)] = state
    state.compile = compile
    AttentionInterface.register(state.name, state.attention)
    AttentionMaskInterface.register(state.name, state.mask)
    model.set_attn_implementation(state.name)
    setattr(model, _ATTR, state)
    model.generate = _budgeted_generate(model, state)
    return model


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`patch`: the model's attention and ``generate`` are as before; returns the model."""
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("model is not patched by momentkv (momentkv.patch was not called on it)")
    model.set_attn_implementation(state.original_attention)
    del model.generate
    delattr(model, _ATTR)
    state.cache = state.active = None  # free the buffers; the state itself is kept for a later patch
    AttentionInterface._global_mapping.pop(state.name, None)
    AttentionMaskInterface._global_mapping.pop(state.name, None)
    return model


@contextmanager
def patched(model: PreTrainedModel, budget: int | None = None, **options: Any) -> Iterator[PreTrainedModel]:
    """``with momentkv.patched(model, budget=64): model.generate(...)`` — unpatched on exit."""
    patch(model, budget, **options)
    try:
        yield model
    finally:
        unpatch(model)


def state_of(model: PreTrainedModel) -> PatchState:
    """The patch state of a patched model (its config and its current cache)."""
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("model is not patched by momentkv")
    return state


# transformers 5.24 renamed generate's ``past_key_values`` (argument and output field) to ``cache``; the old name
# now warns on every use.
GENERATE_CACHE_ARG = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"

_REFUSED = {
    "past_key_values": "momentkv manages the cache itself; do not pass past_key_values",
    "cache": "momentkv manages the cache itself; do not pass cache",
    "assistant_model": "assisted/speculative generation is not supported with a budgeted cache",
    "prompt_lookup_num_tokens": "prompt-lookup (speculative) decoding is not supported with a budgeted cache",
    "cache_implementation": "momentkv manages the cache itself; do not pass cache_implementation",
}


def _budgeted_generate(model: PreTrainedModel, state: PatchState) -> Callable:
    generate = type(model).generate.__get__(model)

    def budgeted_generate(inputs: torch.Tensor | None = None, **kwargs: Any):
        for name, why in _REFUSED.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: {why}")
        gen_config: GenerationConfig = kwargs.get("generation_config") or model.generation_config
        num_beams = kwargs.get("num_beams", gen_config.num_beams) or 1
        if num_beams > 1:
            raise ValueError(f"num_beams must be 1 with momentkv (got {num_beams}); beam search is not supported")
        if kwargs.get("use_cache", gen_config.use_cache) is False:
            raise ValueError("use_cache=False bypasses the cache; momentkv needs use_cache=True")
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt is None or prompt.ndim < 2:
            raise ValueError("momentkv.generate needs a batched prompt (input_ids of shape [batch, length])")
        batch, length = prompt.shape[:2]
        if length == 0:
            raise ValueError("the prompt is empty: give at least one token")
        context = _context_length(model)
        if context is not None and length > context:
            raise ValueError(f"the prompt has {length} tokens, more than the model's context of {context}")
        state.active = _cache_for(model, state, batch, length, prompt.device)
        if state.compile is not None:
            kwargs.setdefault("compile_config", _compile_config(model) if state.compile else None)
            kwargs.setdefault("disable_compile", not state.compile)
        try:
            return generate(inputs, **{GENERATE_CACHE_ARG: state.active}, **kwargs)
        finally:
            state.active = None

    return budgeted_generate


def _context_length(model: PreTrainedModel) -> int | None:
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def _cache_for(model: PreTrainedModel, state: PatchState, batch: int, length: int,
               device: torch.device) -> MomentKVCache:
    """A fresh cache for this prompt: the previous one reset in place when its shape allows."""
    slots = state.config.prompt_slots(length)
    cache = state.cache
    if cache is not None and cache.fits(batch, slots, model.dtype, device):
        cache.reset()
    else:
        cache = state.cache = MomentKVCache(model.config, state.config, slots)
    return cache


def _compile_config(model: PreTrainedModel) -> CompileConfig:
    on_cuda = model.device.type == "cuda"
    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if on_cuda else "default")
    config._compile_all_devices = True  # transformers' flag to compile the decode step off CUDA
    return config
