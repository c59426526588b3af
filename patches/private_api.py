"""The private transformers APIs momentkv needs, each for want of a public one, all in one place.

``tests/test_private_api.py`` checks what each is relied on to do, so a transformers release that changes
one fails there rather than silently in a generation.
"""

from __future__ import annotations

from transformers import CompileConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface


def attention_implementation(model: PreTrainedModel) -> str:
    """The model's attention implementation name: ``set_attn_implementation`` is public, its getter is not."""
    return model.config._attn_implementation


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
