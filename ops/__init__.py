"""momentkv's kernel library: ``torch.library`` custom ops with a plain-PyTorch kernel on every device.

Importing registers the ops under the ``momentkv`` namespace; nothing in torch or
transformers changes otherwise. The ops are ``torch.ops.momentkv.*``; eager code calls them through
:func:`momentkv.ops.kernels.call` with a layer's :class:`LayerState` and :class:`StepSettings`.
"""

import importlib.util

import torch

from .cpu import register_fused_cpu_kernels
from .kernels import call
from .moments import fold_range, fold_token, merge_range, merge_set
from .prefill import prefill_scores
from .scores import HASH, NORMALIZED, POSITION, SCORE_KINDS, STORED, eviction_score
from .state import LayerState, StepSettings

register_fused_cpu_kernels()


def _register_cuda() -> None:
    """Triton kernels for CUDA tensors, where both are available (the reference runs otherwise)."""
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        from .cuda import register_triton_kernels

        register_triton_kernels()


_register_cuda()

__all__ = [
    "HASH",
    "NORMALIZED",
    "POSITION",
    "SCORE_KINDS",
    "STORED",
    "LayerState",
    "StepSettings",
    "call",
    "eviction_score",
    "fold_range",
    "fold_token",
    "merge_range",
    "merge_set",
    "prefill_scores",
]
