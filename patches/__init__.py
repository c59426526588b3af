"""transformers integration: the budgeted cache and the attention function that reads it."""

from .attention import decode_step, key_validity, make_attention, own_attention
from .cache import BudgetedLayer, MomentKVCache
from .support import UnsupportedAttention

__all__ = ["BudgetedLayer", "MomentKVCache", "UnsupportedAttention", "decode_step", "key_validity", "make_attention",
           "own_attention"]
