"""momentkv's kernel library: ``torch.library`` custom ops with a plain-PyTorch kernel on every device.

Importing registers the ops under the ``momentkv`` namespace; nothing in torch or
transformers changes otherwise.
"""

import importlib.util

import torch

from .cpu import register_fused_cpu_kernels
from .decode_attention import decode_attention
from .decode_step import decode_step
from .evict import evict
from .moments import fold_range, fold_token, merge_range, merge_set
from .prefill_scores import prefill_scores
from .scores import MOMENTUM, RANDOM, WINDOW, eviction_score

register_fused_cpu_kernels()


def _register_cuda() -> None:
    """Triton kernels for CUDA tensors, where both are available (the reference runs otherwise)."""
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        from .cuda import register_triton_kernels

        register_triton_kernels()


_register_cuda()

__all__ = [
    "MOMENTUM",
    "RANDOM",
    "WINDOW",
    "decode_attention",
    "decode_step",
    "evict",
    "eviction_score",
    "fold_range",
    "fold_token",
    "merge_range",
    "merge_set",
    "prefill_scores",
]
