"""``momentkv.patch(model, budget=...)``: one line turns a model's ``generate()`` into budgeted decoding.

Only the model given is touched: its attention implementation name, and an instance-level
``generate``. ``unpatch`` restores both; the weights are never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedModel
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from momentkv.config import MomentKVConfig
from momentkv.patches import MomentKVCache, UnsupportedAttention, make_attention, own_attention
from momentkv.patches.parallel import ONE_PROCESS, HeadGroup, head_group
from momentkv.patches.private_api import (attention_parts, compile_on_any_device, effective_generation_config,
                                          unregister)
from momentkv.patches.support import layer_types, refusal
from momentkv.policies import PolicyError

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
    heads: HeadGroup = field(default=ONE_PROCESS, repr=False)  # the tensor-parallel ranks holding the other heads
    attention: Callable | None = field(default=None, repr=False)
    cache: MomentKVCache | None = None
    active: MomentKVCache | None = field(default=None, repr=False)
    # One generation at a time per model: the cache is the model's. Another thread waits its turn.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    owner: int | None = field(default=None, repr=False)
    original_parts: dict = field(default_factory=dict, repr=False)  # each part's attention before patching


def _check_supported(model: Any) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    reason = refusal(model)
    if reason is not None:
        raise ValueError(reason)
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
    elif not isinstance(config, MomentKVConfig):
        raise TypeError(f"config must be a momentkv.MomentKVConfig, got {type(config).__name__}; for a dict, "
                        "pass its entries as options: momentkv.patch(model, **settings)")
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be None, True or False, got {compile!r}")
    config = _fit_defaults(config, _context_length(model))
    _check_bounds(config, _context_length(model))
    heads = head_group(model)
    kv_heads = getattr(model.config.get_text_config(decoder=True), "num_key_value_heads", None)
    if heads.size > 1 and kv_heads and kv_heads % heads.size:
        raise ValueError(f"momentkv cannot patch a model with {kv_heads} KV heads sharded over {heads.size} "
                         "tensor-parallel ranks: the ranks must hold equal shares of the KV heads (transformers' own "
                         "attention fails on this split too); use a tensor-parallel degree that divides the KV heads")

    parts = attention_parts(model)
    text_path = text_decoder_path(model)
    original = _part(parts, text_path)
    states = _REUSABLE.setdefault(model, {})
    state = states.get((config, original))
    if state is None:
        fallback = own_attention(original)
        mask = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask
        state = PatchState(config=config, name=f"momentkv_{next(_names)}", original_attention=original,
                           compile=compile, mask=mask, heads=heads)
        state.attention = make_attention(lambda: state.active, fallback)
        states[(config, original)] = state
    state.compile, state.original_parts = compile, parts
    AttentionInterface.register(state.name, state.attention)
    AttentionMaskInterface.register(state.name, state.mask)
    model.set_attn_implementation(_nested(text_path, state.name))  # the text decoder alone: not a vision tower
    setattr(model, _ATTR, state)
    model.generate = _budgeted_generate(model, state)
    model.__deepcopy__ = lambda memo: _deepcopy_patched(model, memo)
    model.__reduce_ex__ = _refuse_pickling
    try:
        _trial_generation(model, state)
    except PolicyError as error:
        unpatch(model)
        raise ValueError(f"momentkv cannot use policy {config.policy!r}: a two-token trial generation with the "
                         f"budgeted cache failed: {error}") from error
    except Exception as error:  # whatever fails in the model's own code too: patch refuses with a ValueError
        unpatch(model)
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(f"momentkv cannot patch model type {kind!r}: a two-token trial generation with the budgeted "
                         f"cache failed: {type(error).__name__}: {error}") from error
    return model


_INSTANCE_ATTRS = ("generate", "__deepcopy__", "__reduce_ex__", _ATTR)


def text_decoder_path(model: PreTrainedModel) -> tuple[str, ...]:
    """The sub-config keys leading to the text decoder's config (``("text_config",)`` in a vision-language
    model; ``()`` when the model is the decoder): the one part momentkv patches."""
    text = model.config.get_text_config(decoder=True)
    paths = [((), model.config)]
    while paths:
        path, config = paths.pop(0)
        if config is text:
            return path
        paths += [(path + (key,), getattr(config, key)) for key in getattr(config, "sub_configs", {})
                  if getattr(config, key, None) is not None]
    return ()


def _nested(path: tuple[str, ...], value: Any) -> Any:
    """``set_attn_implementation``'s form for one part: ``{"text_config": value}``; the model itself for ()."""
    for key in reversed(path):
        value = {key: value}
    return value if path else {"": value}


def _part(parts: dict, path: tuple[str, ...]) -> str:
    for key in path:
        parts = parts[key]
    return parts if isinstance(parts, str) else parts[""]


def _fit_defaults(config: MomentKVConfig, context: int | None) -> MomentKVConfig:
    """``config`` with each option left at its default cut to the model's context (a model of 48 tokens is
    patched with ``budget`` alone); an option the user chose beyond the context is refused by _check_bounds."""
    if context is None:
        return config
    defaults = MomentKVConfig(budget=config.budget, protect_prompt=config.protect_prompt)
    cut = {name: context for name in ("recent_window", "prompt_bucket", "observation_window", "sinks")
           if getattr(config, name) == getattr(defaults, name) > context}
    return dataclasses.replace(config, **cut) if cut else config


def _check_bounds(config: MomentKVConfig, context: int | None) -> None:
    """No option may size anything beyond the model's context."""
    if context is None:
        return
    for name in ("budget", "prefill_budget", "prompt_bucket", "observation_window", "sinks", "recent_window",
                 "prefill_window"):
        value = getattr(config, name)
        if value is not None and value > context:
            low = 0 if name in ("sinks", "recent_window", "prefill_window") else 1
            raise ValueError(f"{name} must be an int in [{low}, {context}] (the model's context), got {value}")


def _trial_generation(model: PreTrainedModel, state: PatchState) -> None:
    """Two tokens after a three-token prompt through the budgeted cache, so that a model whose attention the
    decode step cannot reproduce (keys transformed after the cache, a cache of its own...) is refused now,
    not after its first answer. It runs on transformers' default generation settings, not the checkpoint's
    (``use_cache: false``, beams, stop strings belong to the generate calls that use them). Its cache is
    dropped; nothing else is kept."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = (torch.arange(3, device=model.device) % vocab)[None]
    checkpoint_settings, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                           do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=True,
                           compile_config=None)
    finally:
        model.generation_config = checkpoint_settings
    decoded = [layer.state.decode_len.item() for layer in state.cache.budgeted_layers if layer.is_initialized]
    state.cache = None
    if not decoded or max(decoded) == 0:
        raise UnsupportedAttention("no full-attention layer decoded through the budgeted cache")


def _deepcopy_patched(model: PreTrainedModel, memo: dict) -> PreTrainedModel:
    """``copy.deepcopy`` of a patched model: an unpatched copy of its weights, patched anew with the same
    configuration, so it generates with its own weights and cache and unpatches on its own."""
    state = _patched_state(model)
    saved = {name: model.__dict__.pop(name) for name in _INSTANCE_ATTRS if name in model.__dict__}
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__.update(saved)
    clone.set_attn_implementation(state.original_parts)
    return patch(clone, config=state.config, compile=state.compile)


def _refuse_pickling(protocol: int) -> None:
    raise TypeError("a model patched by momentkv cannot be pickled or saved whole (its generate and attention belong "
                    "to this process): save model.state_dict() or call momentkv.unpatch(model) first, then patch again "
                    "after loading")


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`patch`: the model's attention and ``generate`` are as before; returns the model. A generation
    in progress in another thread finishes first."""
    state = _patched_state(model)
    if state.owner == threading.get_ident():
        raise RuntimeError("momentkv.unpatch was called from inside a generate of the same model (a streamer or "
                           "stopping criterion?); unpatch after generate returns")
    with state.lock:
        _unpatch(model, state)
    return model


def _unpatch(model: PreTrainedModel, state: PatchState) -> None:
    model.set_attn_implementation(state.original_parts)
    for name in _INSTANCE_ATTRS:
        model.__dict__.pop(name, None)
    state.cache = state.active = None  # free the buffers; the state itself is kept for a later patch
    unregister(state.name)


@contextmanager
def patched(model: PreTrainedModel, budget: int | None = None, **options: Any) -> Iterator[PreTrainedModel]:
    """``with momentkv.patched(model, budget=64): model.generate(...)`` — unpatched on exit."""
    patch(model, budget, **options)
    try:
        yield model
    finally:
        unpatch(model)


def state_of(model: PreTrainedModel) -> PatchState | None:
    """The patch state of a patched model (its config and its current cache); None for a model momentkv has not
    patched, so ``state_of(model) is not None`` asks whether it is."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    return getattr(model, _ATTR, None)


def _patched_state(model: PreTrainedModel) -> PatchState:
    state = state_of(model)
    if state is None:
        raise ValueError("model is not patched by momentkv (momentkv.patch was not called on it)")
    return state


# transformers 5.24 renamed generate's ``past_key_values`` (argument and output field) to ``cache``; the old name
# now warns on every use.
GENERATE_CACHE_ARG = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
# Every name generate takes a cache of the caller's under (the old ones still work).
CACHE_ARGS = tuple(dict.fromkeys(["cache", "past_key_values", *ALL_CACHE_NAMES]))

# Options of generate and GenerationConfig a budgeted cache cannot run, refused when set (in either form).
_REFUSED = {
    "assistant_model": "assisted/speculative generation is not supported with a budgeted cache",
    "prompt_lookup_num_tokens": "prompt-lookup (speculative) decoding is not supported with a budgeted cache",
    "assistant_early_exit": "self-speculative (early-exit) decoding is not supported with a budgeted cache",
    "penalty_alpha": "contrastive search re-runs steps on a cropped cache, which a budgeted cache cannot do",
    "prefill_chunk_size": "chunked prefill writes several tokens per step after the first, which momentkv refuses",
}
# Options that would silently give less than asked: refused when set to anything but these values (None: unset).
_REFUSED_UNLESS = {
    "use_cache": ((True,), "without it generate bypasses the cache (a checkpoint's generation config may say "
                        "use_cache: false after training); pass use_cache=True"),
    "num_beam_groups": ((None, 1), "diverse beam search is beam search, which momentkv does not support"),
    "num_beams": ((None, 1), "beam search reorders the cache between rows, which a budgeted cache does not support"),
    "output_attentions": ((None, False), "the budgeted decode step computes no attention weights to return"),
}


def _checked_call(model: PreTrainedModel, inputs: torch.Tensor | None,
                  kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Refuse what a budgeted cache cannot run, before anything is allocated; returns the prompt and the batch of
    the cache the call needs (rows times returned sequences). The options are read as generate will read them
    (keywords over ``generation_config`` over the checkpoint's), so both forms are refused alike. May replace
    ``kwargs["generation_config"]`` by a copy (the caller's stays as it is) and drops a cache argument of None."""
    for name in CACHE_ARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: momentkv manages the cache itself; do not pass {name}")
        kwargs.pop(name, None)
    given = kwargs.get("generation_config")
    if given is not None and not isinstance(given, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(given).__name__}")
    if kwargs.get("assistant_model") is not None:
        raise ValueError(f"assistant_model: {_REFUSED['assistant_model']}")
    options = {name: value for name, value in kwargs.items() if name != "generation_config"}
    effective = effective_generation_config(model, given, options)
    for name, why in _REFUSED.items():
        if getattr(effective, name, None) is not None:
            raise ValueError(f"{name}: {why}")
    for name, (allowed, why) in _REFUSED_UNLESS.items():
        value = getattr(effective, name, allowed[-1])
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported with momentkv: {why}")
    # A checkpoint's choice of cache yields to momentkv's; one asked for by the call is refused.
    checkpoint_cache = model.generation_config.cache_implementation
    if effective.cache_implementation not in (None, checkpoint_cache):
        raise ValueError(f"cache_implementation={effective.cache_implementation!r}: momentkv manages the cache itself; "
                         "do not pass cache_implementation")
    if given is not None and given.cache_implementation is not None:
        kwargs["generation_config"] = given = copy.deepcopy(given)
        given.cache_implementation = None
    prompt = next((tensor for tensor in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                   if tensor is not None), None)
    if not isinstance(prompt, torch.Tensor) or prompt.ndim < 2:
        raise ValueError("momentkv.generate needs a batched prompt (input_ids of shape [batch, length], or "
                         "inputs_embeds of shape [batch, length, hidden])")
    batch, length = prompt.shape[:2]
    if length == 0:
        raise ValueError("the prompt is empty: give at least one token")
    context = _context_length(model)
    if context is not None and length > context:
        raise ValueError(f"the prompt has {length} tokens, more than the model's context of {context}")
    return prompt, batch * (effective.num_return_sequences or 1)


def _budgeted_generate(model: PreTrainedModel, state: PatchState) -> Callable:
    generate = type(model).generate.__get__(model)

    def budgeted_generate(inputs: torch.Tensor | None = None, **kwargs: Any):
        prompt, batch = _checked_call(model, inputs, kwargs)
        if state.owner == threading.get_ident():
            raise RuntimeError("generate was called again from inside a generate of the same patched model "
                               "(a streamer or stopping criterion?); momentkv runs one generation per model at a time")
        with state.lock:  # a generation in another thread finishes first
            state.owner = threading.get_ident()
            # A checkpoint's choice of cache (generation_config.cache_implementation) yields to momentkv's for
            # this call: transformers fills unset options from the model's config, so it is cleared there.
            checkpoint_cache = model.generation_config.cache_implementation
            model.generation_config.cache_implementation = None
            try:
                state.active = _cache_for(model, state, batch, prompt.shape[1], prompt.device)
                if state.compile is not None:
                    kwargs.setdefault("compile_config", _compile_config(model) if state.compile else None)
                    kwargs.setdefault("disable_compile", not state.compile)
                with state.active.generating():
                    return generate(inputs, **{GENERATE_CACHE_ARG: state.active}, **kwargs)
            finally:
                state.active = state.owner = None
                model.generation_config.cache_implementation = checkpoint_cache

    return budgeted_generate


def _context_length(model: PreTrainedModel) -> int | None:
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def _cache_for(model: PreTrainedModel, state: PatchState, batch: int, length: int,
               device: torch.device) -> MomentKVCache:
    """A fresh cache for this prompt: the previous one reset in place when its shape allows."""
    slots = state.config.prompt_slots(length)
    cache = state.cache
    # What decides the dtypes of keys and values: the weights', and autocast's if on (the two differ: RoPE
    # promotes autocast's keys to fp32), so a cache made under one is never reused under the other.
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    compute = (model.dtype, autocast)
    if cache is not None and cache.fits(batch, slots, compute, device):
        cache.reset()
    else:
        cache = state.cache = MomentKVCache(model.config, state.config, slots, compute, state.heads)
    return cache


# Layer kinds transformers' static cache keeps with a Python int for their length (``cumulative_length_int``,
# 5.17 and 5.25): compiled with static shapes, every decode step recompiled and hit dynamo's limit, as
# transformers' own static cache does. Automatically dynamic, the int turns symbolic at its first change:
# one recompile, then one graph (tests/test_compile.py).
COUNTED_IN_PYTHON = ("sliding_attention", "chunked_attention", "hybrid_sliding")


def _compile_config(model: PreTrainedModel) -> CompileConfig:
    on_cuda = model.device.type == "cuda"
    counted = any(kind in COUNTED_IN_PYTHON for kind in layer_types(model.config)[0])
    return compile_on_any_device(CompileConfig(fullgraph=True, dynamic=None if counted else False,
                                               mode="reduce-overhead" if on_cuda else "default"))
