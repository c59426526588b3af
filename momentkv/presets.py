"""Published eviction rules as named configurations, for comparing against momentkv on the same engine.

``momentkv.patch(model, config=momentkv.presets.streamingllm(budget=64))`` runs StreamingLLM; every
preset takes the options of :class:`MomentKVConfig` as overrides (``correction="moments"`` adds the
moment correction to any of them). None of them corrects by default: the rules are as published. They
keep the prompt unless the rule itself evicts prompt tokens (StreamingLLM), as they were evaluated.
"""

from __future__ import annotations

from typing import Any

from momentkv.config import MomentKVConfig

_PLAIN = dict(correction="none", prefill_carry=0)  # as published: no correction, each prompt token scored alone
_ALONE = dict(prefill_vote=0.0)  # published rules choose prompt tokens per layer and head, not by a vote


def _preset(budget: int, rule: dict[str, Any], overrides: dict[str, Any]) -> MomentKVConfig:
    return MomentKVConfig(budget=budget, **{**_PLAIN, "protect_prompt": True, **rule, **overrides})


def window(budget: int, **overrides: Any) -> MomentKVConfig:
    """A recency window over the decode tokens, the prompt kept: the oldest decode token goes."""
    return _preset(budget, dict(policy="window"), overrides)


def streamingllm(budget: int, **overrides: Any) -> MomentKVConfig:
    """StreamingLLM (Xiao et al., 2024): the first ``sinks`` (4) tokens and a recency window over prompt and
    decode tokens alike."""
    return _preset(budget, dict(policy="window", protect_prompt=False, sinks=4), overrides)


def h2o(budget: int, **overrides: Any) -> MomentKVConfig:
    """H2O (Zhang et al., 2023): cumulative attention (no decay, no bias correction), half the budget a
    recent window."""
    return _preset(budget, dict(alpha=1.0, bias_correction=False, recent_window=budget // 2, **_ALONE), overrides)


def tova(budget: int, **overrides: Any) -> MomentKVConfig:
    """TOVA (Oren et al., 2024) per KV head: the token with the least attention from the newest query goes."""
    return _preset(budget, dict(alpha=0.0, bias_correction=False, recent_window=0, **_ALONE), overrides)


def tova_layer(budget: int, **overrides: Any) -> MomentKVConfig:
    """TOVA as published: one victim per layer, by the newest query's attention averaged over the heads."""
    return tova(budget, **{"scope": "layer", **overrides})


def snapkv(budget: int, **overrides: Any) -> MomentKVConfig:
    """SnapKV-style prompt compression (Li et al., 2024; no pooling): with a ``prefill_budget``, each layer and
    KV head keeps the prompt tokens the last ``observation_window`` (32) queries attend to most, summed, plus
    those queries' own tokens; the compressed prompt is then kept, and decode tokens beyond the budget go by
    cumulative attention outside a 32-token recent window (SnapKV itself never evicts while decoding)."""
    rule = dict(alpha=1.0, bias_correction=False, recent_window=min(32, budget), **_ALONE)
    return _preset(budget, rule, overrides)


def random(budget: int, **overrides: Any) -> MomentKVConfig:
    """Uniformly random eviction (seeded by ``seed``): the floor any rule must beat."""
    return _preset(budget, dict(policy="random", **_ALONE), overrides)


PRESETS = {"window": window, "streamingllm": streamingllm, "h2o": h2o, "tova": tova, "tova-layer": tova_layer,
           "snapkv": snapkv, "random": random}
