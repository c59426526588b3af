"""Which models momentkv can budget exactly, and the reason it gives for those it refuses.

Every rule here is checked at ``patch`` time, from the model's config and modules, so that a model
is either budgeted exactly or refused with a ``ValueError`` that names its type and why; the
architecture sweep (``momentkv models``, docs/models.md) checks the rules against every causal LM.
"""

from __future__ import annotations

import functools
import inspect

from transformers import PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs


class UnsupportedAttention(ValueError):
    """A model's attention does something the budgeted decode step would get wrong."""


FULL, HYBRID = "full_attention", "hybrid"
# Layer kinds whose attention keys and values momentkv budgets: full attention, alone or beside a linear-attention
# or mamba state in the same decoder layer ("hybrid": Falcon-H1, Zamba2; the state stays transformers').
BUDGETED = (FULL, HYBRID)
# Layer kinds whose state transformers' static cache already bounds: momentkv keeps transformers' own
# static layer for them and budgets the full-attention layers around them.
BOUNDED = ("sliding_attention", "chunked_attention", "conv", "linear_attention", "hybrid_sliding", "dummy")


def layer_types(model_config) -> tuple[list[str], list[dict]]:
    """The cache layer kind of each decoder layer, and the arguments of its cache layer (transformers' view)."""
    kinds, kwargs = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
    if isinstance(kwargs, dict):  # transformers before 5.24: one dict for every layer
        kwargs = [kwargs] * len(kinds)
    return kinds, kwargs


@functools.cache
def _calls_attention_interface(module_class: type) -> bool:
    """Whether the class's ``forward`` dispatches attention through ``ALL_ATTENTION_FUNCTIONS`` (what a patch
    replaces), read from its source: transformers' class flag ``_supports_attention_backend`` is unset on many
    models that do (Qwen3.5, Qwen3-Next, the mamba hybrids), and is not what the setter checks either."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(module_class.forward)
    except (AttributeError, OSError, TypeError):  # no forward, or no source (a class built at run time)
        return False


@functools.cache
def _module_dispatches(model_class: type) -> bool:
    """Whether the modeling module of ``model_class`` has attention that dispatches through the interface (a
    configuration of it may still build none, as Bamba's default config does)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(inspect.getmodule(model_class))
    except (OSError, TypeError):
        return False


def model_type(model: PreTrainedModel) -> str:
    return getattr(model.config, "model_type", None) or type(model).__name__


def refusal(model: PreTrainedModel) -> str | None:
    """Why momentkv cannot budget ``model`` exactly (a sentence naming its model type), or None."""
    kind = model_type(model)
    text = model.config.get_text_config(decoder=True)
    if not any(_calls_attention_interface(type(module)) for module in model.modules()):
        if _module_dispatches(type(model)):
            return (f"momentkv cannot patch model type {kind!r}: this configuration builds no attention layer "
                    "(its layers are all recurrent or mamba layers, whose state is bounded already), so a budget "
                    "would change nothing")
        return (f"momentkv cannot patch model type {kind!r}: its attention does not go through transformers' "
                "attention interface (no module's forward calls ALL_ATTENTION_FUNCTIONS; supported: Llama, Mistral, "
                "Qwen2/3/3.5, Phi3, Gemma, Gemma3 and every model whose modeling code does; docs/models.md lists them)")
    if getattr(model.config, "is_encoder_decoder", False) or getattr(text, "add_cross_attention", False):
        return (f"momentkv cannot patch model type {kind!r}: it has cross-attention to an encoder, whose cache "
                "is not a decode-time cache to budget")
    bidirectional = [name for name, module in model.named_modules()
                     if hasattr(module, "layer_idx") and getattr(module, "is_causal", True) is False]
    cross = [name for name in bidirectional if "encoder_attn" in name or "cross" in name]
    if cross:
        return (f"momentkv cannot patch model type {kind!r}: it has cross-attention layers ({cross[0]}) over an "
                "encoder's states, whose cache is not a decode-time cache to budget")
    if bidirectional:
        return (f"momentkv cannot patch model type {kind!r}: its attention is bidirectional (is_causal=False in "
                f"{bidirectional[0]}); build it as a decoder (is_decoder=True) to generate")
    try:
        types, _ = layer_types(model.config)
    except Exception as error:  # a config transformers itself cannot read layer kinds from
        return f"momentkv cannot patch model type {kind!r}: its cache layout is unknown ({type(error).__name__}: {error})"
    unknown = sorted(set(types) - {*BUDGETED, *BOUNDED})
    if unknown:
        return (f"momentkv cannot patch model type {kind!r}: it has {', '.join(map(repr, unknown))} layers; momentkv "
                f"budgets {', '.join(BUDGETED)} layers and keeps transformers' cache for {', '.join(BOUNDED)} layers")
    if not set(BUDGETED) & set(types):
        return (f"momentkv cannot patch model type {kind!r}: none of its layers has full attention (they are "
                f"{', '.join(sorted(set(types)))}), so its cache is bounded already and a budget would change nothing")
    return None
