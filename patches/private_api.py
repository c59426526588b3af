"""The private transformers APIs momentkv needs, each for want of a public one, all in one place.

``tests/test_private_api.py`` checks what each is relied on to do, so a transformers release that changes
one fails there rather than silently in a generation.
"""

from __future__ import annotations

from typing import Any

from transformers import CompileConfig, GenerationConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface


def attention_parts(model: PreTrainedModel) -> dict:
    """The attention implementation of the model and of each of its parts (text, vision, audio...), in the form
    ``set_attn_implementation`` takes back: ``{"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}``. A
    part with parts of its own is a dict of the same form (transformers 5.17 takes strings only there). The setter
    is public, the getter is not."""

    def parts(config) -> dict:
        return {"": config._attn_implementation, **{key: part(getattr(config, key)) for key in
                                                      getattr(config, "sub_configs", {})
                                                      if getattr(config, key, None) is not None}}

    def part(config) -> str | dict:
        found = parts(config)
        return found if len(found) > 1 else found[""]

    return parts(model.config)


def effective_generation_config(model: PreTrainedModel, generation_config: GenerationConfig | None,
                                options: dict[str, Any]) -> GenerationConfig:
    """The generation settings ``model.generate(generation_config=..., **options)`` will run with: the keywords
    over the given config over the checkpoint's over transformers' defaults, resolved by generate's own (private)
    method, so that a check reads an option as generate will, in whichever form it was given."""
    effective, _ = model._prepare_generation_config(generation_config, **options)
    return effective


def unregister(name: str) -> None:
    """Remove an attention and a mask function registered under ``name``: ``register`` is public, removal is not
    (without it every patch would leave an entry behind in transformers' global registries)."""
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def device_mesh(model: PreTrainedModel):
    """The device mesh a model was sharded over (tensor, data or pipeline parallelism), or None: transformers
    keeps it in ``model._device_mesh``; before 5.24 its tensor-parallel weights are plain tensors, so the
    mesh is not found from them."""
    return getattr(model, "_device_mesh", None)


def compile_on_any_device(config: CompileConfig) -> CompileConfig:
    """``config`` with transformers' flag that compiles the decode step on every device, not only on
    CUDA/XPU/TPU/Neuron (no public option says so); returns it."""
    config._compile_all_devices = True
    return config
