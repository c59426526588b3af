"""``momentkv.patch(model, budget=...)``: one line turns a model's ``generate()`` into budgeted decoding.

Only the model given is touched: its attention implementation name, and an instance-level
``generate``. ``unpatch`` restores both; the weights are never modified.
"""

from __future__ import annotations

import copy
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
from momentkv.patches.private_api import attention_implementation, compile_on_any_device, unregister
from momentkv.patches.support import refusal
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
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be None, True or False, got {compile!r}")
    _check_bounds(config, _context_length(model))
    heads = head_group(model)
    kv_heads = getattr(model.config.get_text_config(decoder=True), "num_key_value_heads", None)
    if heads.size > 1 and kv_heads and kv_heads % heads.size:
        raise ValueError(f"momentkv cannot patch a model with {kv_heads} KV heads sharded over {heads.size} "
                         "tensor-parallel ranks: the ranks must hold equal shares of the KV heads (transformers' own "
                         "attention fails on this split too); use a tensor-parallel degree that divides the KV heads")

    original = attention_implementation(model)
    states = _REUSABLE.setdefault(model, {})
    state = states.get((config, original))
    if state is None:
        fallback = own_attention(original)
        mask = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask
        state = PatchState(config=config, name=f"momentkv_{next(_names)}", original_attention=original,
                           compile=compile, mask=mask, heads=heads)
        state.attention = make_attention(lambda: state.active, fallback)
        states[(config, original)] = state
    state.compile = compile
    AttentionInterface.register(state.name, state.attention)
    AttentionMaskInterface.register(state.name, state.mask)
    model.set_attn_implementation(state.name)
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
    except (UnsupportedAttention, ValueError) as error:
        unpatch(model)
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(f"momentkv cannot patch model type {kind!r}: a two-token trial generation with the budgeted "
                         f"cache failed: {error}") from error
    return model


_INSTANCE_ATTRS = ("generate", "__deepcopy__", "__reduce_ex__", _ATTR)


def _check_bounds(config: MomentKVConfig, context: int | None) -> None:
    """No option may size anything beyond the model's context."""
    if context is None:
        return
    for name in ("budget", "prefill_budget", "prompt_bucket", "observation_window", "sinks", "recent_window"):
        value = getattr(config, name)
        if value is not None and value > context:
            low = 0 if name in ("sinks", "recent_window") else 1
            raise ValueError(f"{name} must be an int in [{low}, {context}] (the model's context), got {value}")


def _trial_generation(model: PreTrainedModel, state: PatchState) -> None:
    """Two tokens after a three-token prompt through the budgeted cache, so that a model whose attention the
    decode step cannot reproduce (keys transformed after the cache, a cache of its own...) is refused now,
    not after its first answer. Its cache is dropped; nothing else is kept."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = (torch.arange(3, device=model.device) % vocab)[None]
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=True, compile_config=None)
    decoded = [layer.state.decode_len.item() for layer in state.cache.budgeted_layers if layer.is_initialized]
    state.cache = None
    if not decoded or max(decoded) == 0:
        raise UnsupportedAttention("no full-attention layer decoded through the budgeted cache")


def _deepcopy_patched(model: PreTrainedModel, memo: dict) -> PreTrainedModel:
    """``copy.deepcopy`` of a patched model: an unpatched copy of its weights, patched anew with the same
    configuration, so it generates with its own weights and cache and unpatches on its own."""
    state = state_of(model)
    saved = {name: model.__dict__.pop(name) for name in _INSTANCE_ATTRS if name in model.__dict__}
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__.update(saved)
    clone.set_attn_implementation(state.original_attention)
    return patch(clone, config=state.config, compile=state.compile)


def _refuse_pickling(protocol: int) -> None:
    raise TypeError("a model patched by momentkv cannot be pickled or saved whole (its generate and attention belong "
                    "to this process): save model.state_dict() or call momentkv.unpatch(model) first, then patch again "
                    "after loading")


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`patch`: the model's attention and ``generate`` are as before; returns the model."""
    state = state_of(model)
    model.set_attn_implementation(state.original_attention)
    for name in _INSTANCE_ATTRS:
        model.__dict__.pop(name, None)
    state.cache = state.active = None  # free the buffers; the state itself is kept for a later patch
    unregister(state.name)
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
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("model is not patched by momentkv (momentkv.patch was not called on it)")
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
    "penalty_alpha": "contrastive search re-runs steps on a cropped cache, which a budgeted cache cannot do",
    "prefill_chunk_size": "chunked prefill writes several tokens per step after the first, which momentkv refuses",
}
# Flags that would silently give less than asked: refused when set to anything but these values.
_REFUSED_UNLESS = {
    "output_attentions": (False, "the budgeted decode step computes no attention weights to return"),
    "num_beam_groups": (1, "diverse beam search is beam search, which momentkv does not support"),
}


def _checked_call(model: PreTrainedModel, inputs: torch.Tensor | None,
                  kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Refuse what a budgeted cache cannot run, before anything is allocated; returns the prompt and the batch of
    the cache the call needs (rows times returned sequences). May replace ``kwargs["generation_config"]`` by a copy (the caller's stays as it is)."""
    for name, why in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: {why}")
    gen_config: GenerationConfig = kwargs.get("generation_config") or model.generation_config
    if not isinstance(gen_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(gen_config).__name__}")
    for name, (allowed, why) in _REFUSED_UNLESS.items():
        value = kwargs.get(name, getattr(gen_config, name, allowed))
        if value not in (None, allowed):
            raise ValueError(f"{name}={value!r} is not supported with momentkv: {why}")
    num_beams = kwargs.get("num_beams", gen_config.num_beams) or 1
    if num_beams > 1:
        raise ValueError(f"num_beams must be 1 with momentkv (got {num_beams}); beam search is not supported")
    if kwargs.get("use_cache", gen_config.use_cache) is False:
        raise ValueError("use_cache=False bypasses the cache; momentkv needs use_cache=True")
    if "generation_config" in kwargs and gen_config.cache_implementation is not None:
        kwargs["generation_config"] = gen_config = copy.deepcopy(gen_config)
        gen_config.cache_implementation = None
    prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if not isinstance(prompt, torch.Tensor) or prompt.ndim < 2:
        raise ValueError("momentkv.generate needs a batched prompt (input_ids of shape [batch, length])")
    batch, length = prompt.shape[:2]
    if length == 0:
        raise ValueError("the prompt is empty: give at least one token")
    context = _context_length(model)
    if context is not None and length > context:
        raise ValueError(f"the prompt has {length} tokens, more than the model's context of {context}")
    return prompt, batch * (kwargs.get("num_return_sequences", gen_config.num_return_sequences) or 1)


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
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.dtype
    if cache is not None and cache.fits(batch, slots, dtype, device):
        cache.reset()
    else:
        cache = state.cache = MomentKVCache(model.config, state.config, slots, dtype, state.heads)
    return cache


def _compile_config(model: PreTrainedModel) -> CompileConfig:
    on_cuda = model.device.type == "cuda"
    return compile_on_any_device(CompileConfig(fullgraph=True, dynamic=False,
                                               mode="reduce-overhead" if on_cuda else "default"))
