"""transformers integration: the budgeted cache and the attention function that reads it."""

from .attention import UnsupportedAttention, decode_step, key_validity, make_attention, own_attention
from .cache import BudgetedLayer, MomentKVCache

__all__ = ["BudgetedLayer", "MomentKVCache", "UnsupportedAttention", "decode_step", "key_validity", "make_attention",
           "own_attention"]
