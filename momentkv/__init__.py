"""momentkv: a fixed-size KV cache for Hugging Face transformers.

Momentum eviction chooses which decode-time tokens to keep within a budget; a moment
correction adds back a first-order estimate of the attention the evicted tokens would
have received. The public names load on first use (``momentkv --help`` imports neither torch nor
transformers); loading them registers the ``momentkv::`` torch ops and changes nothing else;
:func:`patch` changes only the model it is given.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Each public name and the module defining it: the one list ``__all__`` and the lazy loading read.
_PUBLIC = {
    "MomentKVCache": "momentkv.patches",
    "MomentKVConfig": "momentkv.config",
    "patch": "momentkv.patching",
    "patched": "momentkv.patching",
    "policy_names": "momentkv.policies",
    "presets": "momentkv.presets",
    "register_policy": "momentkv.policies",
    "state_of": "momentkv.patching",
    "unpatch": "momentkv.patching",
    "unregister_policy": "momentkv.policies",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'momentkv' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    value = module if module.__name__ == f"momentkv.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
