"""transformers integration: the budgeted cache and the attention function that reads it."""

from .attention import decode_step, key_validity, make_attention
from .cache import BudgetedLayer, MomentKVCache

__all__ = ["BudgetedLayer", "MomentKVCache", "decode_step", "key_validity", "make_attention"]
