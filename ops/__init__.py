"""momentkv's kernel library: ``torch.library`` custom ops with a plain-PyTorch kernel on every device.

Importing registers the ops under the ``momentkv`` namespace; nothing in torch or
transformers changes otherwise.
"""

from .cpu import register_fused_cpu_kernels
from .decode_attention import decode_attention
from .evict import evict
from .moments import fold_token, merge_set
from .prefill_scores import prefill_scores
from .scores import MOMENTUM, RANDOM, WINDOW, eviction_score

FUSED_CPU = register_fused_cpu_kernels()

__all__ = [
    "MOMENTUM",
    "RANDOM",
    "WINDOW",
    "decode_attention",
    "evict",
    "eviction_score",
    "fold_token",
    "merge_set",
    "prefill_scores",
]
