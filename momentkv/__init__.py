"""momentkv: a fixed-size KV cache for Hugging Face transformers.

Momentum eviction chooses which decode-time tokens to keep within a budget; a moment
correction adds back a first-order estimate of the attention the evicted tokens would
have received. Importing this package registers the ``momentkv::`` torch ops and
changes nothing else; :func:`patch` changes only the model it is given.
"""

from momentkv import presets
from momentkv.config import MomentKVConfig
from momentkv.patches import MomentKVCache
from momentkv.patching import patch, patched, state_of, unpatch
from momentkv.policies import policy_names, register_policy, unregister_policy

__version__ = "0.1.0"
__all__ = ["MomentKVCache", "MomentKVConfig", "patch", "patched", "policy_names", "presets", "register_policy",
           "state_of", "unpatch", "unregister_policy"]
