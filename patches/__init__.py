"""transformers integration: the budgeted cache and the attention function that routes to it."""

from .attention import key_validity, make_attention, own_attention
from .cache import BudgetedLayer, MomentKVCache
from .support import UnsupportedAttention

__all__ = ["BudgetedLayer", "MomentKVCache", "UnsupportedAttention", "key_validity", "make_attention",
           "own_attention"]
