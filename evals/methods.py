"""The methods compared, each a named setting of :class:`MomentKVConfig` (or the full cache).

Every baseline runs through the same engine, so differences come from the rule alone.
``variants`` are rules tried while choosing the defaults; they stay in the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import momentkv
from momentkv import MomentKVConfig, presets


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    recent_fraction: float | None = None  # protected recent window as a fraction of the budget
    preset: Callable[..., MomentKVConfig] = MomentKVConfig  # a published rule's preset, or momentkv's defaults

    def config(self, budget: int, **extra: Any) -> MomentKVConfig:
        options = dict(self.options, **extra)
        if self.recent_fraction is not None:
            options["recent_window"] = int(self.recent_fraction * budget)
        return self.preset(budget, **options)


FULL = "full"
_PLAIN = dict(correction="none")
# pinned: the rows keep their meaning whatever the library's default (prefill_carry=10 is the default since
# issue 25; it acts only when a prefill budget compresses the prompt, and these rows were measured without it)
_UNPROTECTED = dict(protect_prompt=False, sinks=4, prefill_carry=0)
_KEPT = dict(protect_prompt=True, prefill_carry=0)
_ALONE = dict(prefill_vote=0.0)  # published rules choose prompt tokens per layer (and head)

BASELINES = (
    Method("momentum", "momentkv with the prompt kept, without moment correction", dict(**_PLAIN, **_KEPT)),
    Method("momentum-open", "momentkv-open without moment correction", dict(**_PLAIN, **_UNPROTECTED)),
    Method("window+moments", "recency window, prompt kept, with moment correction", dict(correction="moments"),
           preset=presets.window),
    Method("window", "recency window, prompt kept", preset=presets.window),
    Method("streamingllm", "recency window over prompt and decode tokens, 4 sinks kept", preset=presets.streamingllm),
    Method("h2o", "cumulative attention, half the budget a recent window (H2O)", preset=presets.h2o),
    Method("tova", "instantaneous attention per KV head (TOVA)", preset=presets.tova),
    Method("tova-layer", "instantaneous attention shared across a layer's heads (TOVA as published)",
           preset=presets.tova_layer),
    Method("snapkv", "SnapKV-style prompt compression: each layer and KV head keeps the prompt tokens the last 32 "
           "queries attend to most", preset=presets.snapkv),
    Method("random", "uniformly random eviction", preset=presets.random),
)

MOMENTKV = (
    Method("momentkv", "momentkv with the prompt kept (protect_prompt=True; the default until issue 25): momentum "
           "(a=0.9, bias-corrected) chooses one eighth of the budget, the rest a recent window, moment correction; "
           "a prefill budget keeps the prompt tokens the deeper 60% of the layers vote for", _KEPT),
    Method("momentkv-open", "momentkv's defaults, prompt tokens competing (protect_prompt=False, 4 sinks): the "
           "newest max(budget, 64) tokens kept, momentum picks which prompt and older tokens fill the rest; with a "
           "prefill budget each prompt token scored alone (prefill_carry=0; the default is momentkv-open-carry10)",
           _UNPROTECTED),
)

# Rules tried while choosing the defaults (held-apart prompts); kept in every table.
VARIANTS = (
    Method("momentkv-protected-r8", "momentum a=0.9, bias-corrected, 8 recent protected, prompt kept",
           dict(protect_prompt=True, recent_window=8)),
    Method("momentum-r8", "momentkv-protected-r8 without moment correction (the prototype's rule)",
           dict(protect_prompt=True, recent_window=8, **_PLAIN)),
    Method("momentkv-protected-r50", "as above with half the budget a recent window, prompt kept",
           dict(protect_prompt=True), recent_fraction=0.5),
    Method("momentkv-protected-r88", "as above with seven eighths of the budget a recent window, prompt kept",
           dict(protect_prompt=True), recent_fraction=0.875),
    Method("momentkv-protected-r94", "as above with fifteen sixteenths of the budget a recent window, prompt kept",
           dict(protect_prompt=True), recent_fraction=0.9375),
    Method("momentkv-open-r50", "prompt competes (4 sinks), half the budget recent", _UNPROTECTED,
           recent_fraction=0.5),
    Method("momentkv-open-r100", "prompt competes (4 sinks), the whole budget recent: momentum picks which "
           "prompt and older tokens stay", _UNPROTECTED, recent_fraction=1.0),
    Method("momentkv-open-r100-a50", "as above with alpha 0.5", dict(alpha=0.5, **_UNPROTECTED),
           recent_fraction=1.0),
    Method("momentkv-open-r100-layer", "as above, one victim per layer", dict(scope="layer", **_UNPROTECTED),
           recent_fraction=1.0),
    Method("momentkv-open-r100-plain", "as momentkv-open-r100 without moment correction",
           dict(**_UNPROTECTED, **_PLAIN), recent_fraction=1.0),
    Method("streamingllm+moments", "StreamingLLM with moment correction", dict(correction="moments"),
           preset=presets.streamingllm),
    Method("momentkv-informed", "momentkv with moment-informed eviction: momentum of the attention the "
           "moments would not recover (moment_weight=1)", dict(moment_weight=1.0, **_KEPT)),
    Method("momentkv-open-informed", "momentkv-open with moment-informed eviction (moment_weight=1)",
           dict(moment_weight=1.0, **_UNPROTECTED)),
    Method("momentkv-open-w48", "prompt competes (4 sinks), the newest 48 tokens kept whatever the budget",
           dict(recent_window=48, **_UNPROTECTED)),
    Method("momentkv-open-w96", "prompt competes (4 sinks), the newest 96 tokens kept whatever the budget",
           dict(recent_window=96, **_UNPROTECTED)),
    Method("momentkv-open-wcap", "prompt competes (4 sinks), the recent window as large as the cap allows: "
           "momentum chooses one evictable slot in eight at every budget", dict(recent_window=1 << 20, **_UNPROTECTED)),
    Method("momentkv-open-a99-r50", "prompt competes (4 sinks), slow momentum (alpha 0.99), half the budget recent: "
           "the lead along sampled text (issue 25)", dict(alpha=0.99, **_UNPROTECTED), recent_fraction=0.5),
    Method("momentkv-open-a99", "momentkv-open with slow momentum (alpha 0.99), the default window",
           dict(alpha=0.99, **_UNPROTECTED)),
    Method("momentkv-open-carry10", "momentkv's defaults since issue 25: momentkv-open with prefill_carry=10, each "
           "prompt token's prefill score the best of the 10 tokens before it (the value after a key the question "
           "names)", {**_UNPROTECTED, "prefill_carry": 10}),
    Method("momentkv-open-carry10-w64", "the default with a 64-token recent window (at prefill compression, the "
           "window the vote's choice starts after; the default is max(budget, 64) capped at 7/8 of the prefill "
           "budget)", {**_UNPROTECTED, "prefill_carry": 10, "recent_window": 64}),
    Method("momentkv-open-carry10-w0", "the default without a recent window: past the sinks, the vote alone "
           "chooses the prompt tokens kept", {**_UNPROTECTED, "prefill_carry": 10, "recent_window": 0}),
    Method("momentkv-open-carry10-obs1", "the default scoring the prompt by its last token's attention alone "
           "(observation_window=1, as TOVA)", {**_UNPROTECTED, "prefill_carry": 10, "observation_window": 1}),
    Method("momentkv-open-carry10-obs1-w64", "momentkv-open-carry10-obs1 with a 64-token recent window",
           {**_UNPROTECTED, "prefill_carry": 10, "observation_window": 1, "recent_window": 64}),
    Method("momentkv-open-carry10-vote0", "the default with each layer and head choosing its prompt tokens alone "
           "(prefill_vote=0)", {**_UNPROTECTED, "prefill_carry": 10, **_ALONE}),
    Method("momentkv-vote0", "momentkv with each layer and head choosing its prompt tokens alone (prefill_vote=0, "
           "SnapKV-style: the default before the vote)", dict(**_ALONE, **_KEPT)),
    Method("momentkv-open-vote0", "momentkv-open with each layer and head choosing its prompt tokens alone",
           dict(**_ALONE, **_UNPROTECTED)),
    Method("momentkv-vote50", "momentkv with half of each layer's prefill score its own, half the vote "
           "(prefill_vote=0.5)", dict(prefill_vote=0.5, **_KEPT)),
    Method("momentkv-open-vote50", "momentkv-open with prefill_vote=0.5", dict(prefill_vote=0.5, **_UNPROTECTED)),
    Method("momentkv-d67", "momentkv with only the deepest third of the layers voting (vote_depth=0.67)",
           dict(vote_depth=0.67, **_KEPT)),
    Method("momentkv-vote50-d67", "momentkv-vote50 with only the deepest third voting",
           dict(prefill_vote=0.5, vote_depth=0.67, **_KEPT)),
)

# Every registered rule inside momentkv's engine with its defaults (prompt tokens competing, the moment
# correction) and without the correction: the rule alone is what differs between these rows.
RULES = tuple(row for name in momentkv.policy_names() for row in (
    Method(f"rule-{name}", f"the registered rule {name!r} with momentkv's defaults (policy={name!r})",
           dict(policy=name)),
    Method(f"rule-{name}-plain", f"the registered rule {name!r} with momentkv's defaults, without the moment "
           "correction", dict(policy=name, correction="none"))))

METHODS: dict[str, Method] = {m.name: m for m in (*MOMENTKV, *BASELINES, *VARIANTS, *RULES)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {FULL}, {', '.join(METHODS)}")
    return METHODS[name]
