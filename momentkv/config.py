"""One validated configuration object for every eviction rule momentkv runs.

The rule is a registered policy (``momentkv.policies``); the rest are the engine's settings, the same for
every rule: budgets, the recent window, sinks, the moment correction, the prefill selection.
``protect_prompt=False`` with ``sinks`` and the window policy is StreamingLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from momentkv.ops.scores import STORED
from momentkv.ops.selection import window_cap
from momentkv.ops.state import StepSettings

CORRECTIONS = ("moments", "none")
SCOPES = ("head", "layer")

# The smallest default recent window when prompt tokens compete: below it, fidelity on the
# held-apart prompts fell at every budget tried (results/eval/sweep.md).
OPEN_RECENT_WINDOW = 64


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {accepted}, got {value}")


def _check_fraction(config: Any, name: str, below_one: bool = False) -> None:
    """A float field in [0, 1] (in [0, 1) if ``below_one``), stored as float."""
    value = getattr(config, name)
    accepted = "[0, 1)" if below_one else "[0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in {accepted}, got {type(value).__name__}")
    if math.isnan(value) or not 0.0 <= value <= 1.0 or (below_one and value == 1.0):
        raise ValueError(f"{name} must be a float in {accepted}, got {value}")
    object.__setattr__(config, name, float(value))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


@dataclass(frozen=True)
class MomentKVConfig:
    """How the budgeted cache chooses, keeps and summarises tokens.

    budget: decode-time slots per layer and KV head (the cache holds ``P + budget + 1``).
    alpha: momentum decay of each token's attention score, in [0, 1].
    bias_correction: divide the momentum score by the same EMA of ones (Adam-style), so new
        tokens are not penalised for having been seen fewer times (the momentum rule's option).
    policy: the eviction rule, a name registered in ``momentkv.policies`` (``momentkv.policy_names()``):
        "momentum" (default), "window" (oldest goes), "random", "h2o", "tova", "keynorm", "keydiff", or
        one added with ``momentkv.register_policy``.
    recent_window: the most recent tokens that are never evicted. With the prompt kept it is at
        most the budget, default ``budget - budget // 8``. When prompt tokens compete it may be any size,
        default ``max(budget, 64)``, and at decode time it never covers more than 7/8 of the
        evictable slots the cache holds: momentum chooses which prompt and older tokens fill the
        rest of the cache (if those are all sinks, the oldest goes: the StreamingLLM rule). At prefill
        compression, in both modes, it covers at most 7/8 of the ``prefill_budget - sinks`` slots, so the
        prefill scores choose the rest. Both defaults were chosen on held-apart prompts (results/eval/sweep.md).
    correction: "moments" adds the evicted set back as a virtual key; "none" drops it.
    moment_weight: moment-informed eviction, in [0, 1]. At 1 a slot's momentum accumulates only
        the attention the moments would not recover if it were evicted (its probability minus
        the first-order estimate from the evicted mean key); at 0 (default) all of it. It changed
        nothing measurable on the held-apart prompts (results/eval/sweep.md).
    protect_prompt: if False (default), prompt tokens compete with decode tokens for slots, except the
        first ``sinks``; if True, every prompt token (or every one the prefill budget keeps) stays. Prompt
        tokens competing led at equal memory on every workload measured: long generation along greedy and
        sampled text, long prompts, streaming perplexity, retrieval (docs/results.md, "Choosing the default").
    sinks: leading prompt tokens never evicted when prompt tokens can be evicted.
    prefill_budget: if set, prompts longer than this are compressed at prefill to
        this many slots (SnapKV-style scoring over the last ``observation_window`` queries).
    prefill_window: the newest prompt tokens kept at prefill compression before the scores choose (capped as
        ``recent_window`` is); None (default): ``recent_window``. Set apart from the decode window because the
        decode window's size, the whole decode budget by default, can crowd the vote out: at decode budget 256 and
        prefill budget 256 it took 221 of the 252 choosable slots, and 64 lowered the long prompts' KL by a third
        there (docs/results.md). Needs a ``prefill_budget``.
    observation_window: prompt queries used to score prompt tokens.
    prefill_vote: weight, in [0, 1], of a model-wide vote in each layer's prefill selection. The vote
        is the prompt-token scores of the budgeted layers from ``vote_depth`` of the depth on, each head's
        as a share of its total, averaged. At 0 each layer and head chooses alone (SnapKV); at 1 (default)
        every layer keeps the same tokens. With a vote, every layer's prompt keys and values are held
        until the last layer has scored its own (the full cache's size, during prefill only). Chosen on
        the retrieval tasks and long prompts, the depth checked on held-apart needle samples
        (results/eval/fidelity.md, results/eval/needle-probe-niah_multikey-seed*.json).
    vote_depth: where the voting layers start, as a fraction of the budgeted layers, in [0, 1).
    prefill_carry: at prefill compression, each prompt token's score is raised to the best of the
        ``prefill_carry`` tokens before it, so that what follows a token the question attends to (the value
        after a key the question names) is kept with it; 0 scores each token alone (as SnapKV). The default,
        10, was chosen on lm-eval's RULER, the retrieval tasks and long prompts (docs/results.md).
    scope: "head" evicts per KV head; "layer" shares one victim across a layer's heads.
    prompt_bucket: prompt slots are sized in multiples of this, so that a compiled
        decode step is reused across prompts of similar length.
    seed: seed of the "random" policy.
    """

    budget: int
    alpha: float = 0.9
    bias_correction: bool = True
    policy: str = "momentum"
    recent_window: int | None = None
    correction: str = "moments"
    moment_weight: float = 0.0
    protect_prompt: bool = False
    sinks: int = 4
    prefill_budget: int | None = None
    prefill_window: int | None = None
    observation_window: int = 32
    prefill_vote: float = 1.0
    vote_depth: float = 0.4
    prefill_carry: int = 10
    scope: str = "head"
    prompt_bucket: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("budget", self.budget, 1)
        _check_fraction(self, "alpha")
        _check_bool("bias_correction", self.bias_correction)
        from momentkv.policies import policy  # the rules import this module's fields to check theirs

        policy(self.policy)
        if self.recent_window is None:
            window = (window_cap(self.budget) if self.protect_prompt
                      else max(self.budget, OPEN_RECENT_WINDOW))
            object.__setattr__(self, "recent_window", window)
        _check_int("recent_window", self.recent_window, 0, self.budget if self.protect_prompt else None)
        _check_choice("correction", self.correction, CORRECTIONS)
        _check_fraction(self, "moment_weight")
        if self.moment_weight and self.correction != "moments":
            raise ValueError(f"moment_weight={self.moment_weight} needs correction='moments' (it weighs what the "
                             f"moments recover); got correction={self.correction!r}")
        _check_bool("protect_prompt", self.protect_prompt)
        _check_int("sinks", self.sinks, 0)
        _check_int("observation_window", self.observation_window, 1)
        _check_fraction(self, "prefill_vote")
        _check_fraction(self, "vote_depth", below_one=True)  # at 1 no layer would vote
        _check_int("prefill_carry", self.prefill_carry, 0)
        if self.prefill_budget is not None:
            _check_int("prefill_budget", self.prefill_budget, self.sinks + 1)
        if self.prefill_window is not None:
            _check_int("prefill_window", self.prefill_window, 0)
            if self.prefill_budget is None:
                raise ValueError(f"prefill_window={self.prefill_window} needs a prefill_budget (it sizes the window "
                                 "of the prefill compression, which only a prefill_budget turns on)")
        _check_choice("scope", self.scope, SCOPES)
        _check_int("prompt_bucket", self.prompt_bucket, 1)
        _check_int("seed", self.seed, 0, 2**31 - 1)

    def step_settings(self) -> StepSettings:
        """The decode ops' settings for this configuration (built once per layer)."""
        from momentkv.policies import policy

        kernel = policy(self.policy).kernel
        return StepSettings(alpha=self.alpha, moments=self.corrected, moment_weight=self.moment_weight,
                            budget=self.budget, score_kind=kernel(self) if kernel else STORED,
                            recent_window=self.recent_window, cap_window=self.cap_window,
                            layer_scope=self.scope == "layer", seed=self.seed)

    @property
    def cap_window(self) -> bool:
        """Whether decode eviction caps the window at ``window_cap`` of the evictable slots held: with prompt
        tokens competing, so that a short prompt does not leave momentum nothing to choose. With the prompt
        kept the default window is ``window_cap(budget)`` already (half the budget fell behind the plain
        window at 512 tokens, results/eval/sweep-512.md)."""
        return not self.protect_prompt

    @property
    def corrected(self) -> bool:
        return self.correction == "moments"

    @property
    def prefill_recent(self) -> int:
        """The newest prompt tokens the prefill selection keeps first (before its cap)."""
        return self.recent_window if self.prefill_window is None else self.prefill_window

    def prompt_slots(self, prompt_len: int) -> int:
        """Prompt region size for a prompt of ``prompt_len`` tokens (bucketed, capped by the prefill budget)."""
        bucket = self.prompt_bucket
        slots = max(1, -(-prompt_len // bucket)) * bucket
        if self.prefill_budget is not None:
            slots = min(slots, self.prefill_budget)
        return slots
