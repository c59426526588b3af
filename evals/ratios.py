"""kvpress's compression ratio in momentkv's terms: how many prompt tokens a prompt keeps at a ratio.

kvpress sizes its prefill compression by the share of the prompt evicted; momentkv by a prefill budget in tokens.
Comparing the two at equal memory means giving momentkv, prompt by prompt, the budget the press keeps.
"""

from __future__ import annotations

from typing import Any


def check_compression_ratio(ratio: Any, name: str = "compression_ratio") -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"{name} must be a number in [0, 1) (the share of the prompt evicted), got {ratio!r}")


def kept_tokens(length: int, ratio: float) -> int:
    """Prompt tokens kept at ``ratio``, as kvpress counts them (``kvpress.utils.compute_n_kept``)."""
    return max(1, int(length * (1 - ratio)))


def prefill_budget(length: int, ratio: float, sinks: int) -> int:
    """momentkv's prefill budget for a prompt of ``length`` at ``ratio``: the tokens the press keeps, or the least a
    prefill budget may be (``sinks + 1``) for prompts of a few tokens at high ratios."""
    return max(kept_tokens(length, ratio), sinks + 1)
