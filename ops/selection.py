"""The keep order, the one rule by which every choice of tokens is made: decode eviction, prefill
compression and the model-wide prefill vote.

Slots are kept in tiers: protected slots (the sinks) first, then the recent window newest first,
then the rest by score. Decode eviction drops the last slot of that order; prefill compression keeps
its first ``prefill_budget`` slots. The window never covers more than :func:`window_cap` of the slots
it competes for, so the score always chooses some. The Triton evict kernel mirrors this and is
tested against it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .scores import eviction_score

# A recent window covers at most all but one in WINDOW_CAP of the evictable slots (7 in 8).
WINDOW_CAP = 8

# Tiers of the keep order, last kept first; a tier's offset dwarfs any score or position within it.
SCORED, RECENT, PROTECTED = 0, 1, 2
_TIER_GAP = float(2**40)


def window_cap(slots: int | Tensor) -> int | Tensor:
    """The most of ``slots`` evictable slots a recent window may cover, so that the score chooses the rest."""
    return slots - slots // WINDOW_CAP


def keep_rank(score: Tensor, positions: Tensor, recent: Tensor, protected: Tensor | None = None) -> Tensor:
    """float64 rank of each slot in the keep order, higher kept longer: protected slots, then the
    ``recent`` ones by position (newest last to go), then the rest by score."""
    tier = recent.to(torch.int64)
    if protected is not None:
        tier = torch.where(protected, PROTECTED, tier)
    within = torch.where(tier == SCORED, score.double(), positions.double())
    return tier.double() * _TIER_GAP + within


Combine = Callable[[Tensor, str], Tensor]  # (tensor, "sum" | "min" | "max") -> the same over every rank


def eviction_rank(*, importance: Tensor, normalizer: Tensor, positions: Tensor, valid: Tensor, evictable: Tensor,
                  seen: Tensor, decode_len: Tensor, score_kind: int, seed: int, recent_window: int, cap_window: bool,
                  layer_scope: bool, combine: Combine | None = None, ranks: int = 1, **_: Any) -> Tensor:
    """[B, H, S] float64: each slot's :func:`keep_rank` at decode (the lowest goes; +inf where nothing may go).

    The score is read as ``score_kind`` (``ops.scores``). Recent: the ``recent_window`` newest tokens, with
    ``cap_window`` at most :func:`window_cap` of the evictable slots held. With ``layer_scope`` every head of a
    sequence gets one rank: the heads' mean score and age, recent if recent in any head, evictable if in every
    head. Under tensor parallelism the heads are split over ``ranks`` ranks and ``combine`` adds the other
    ranks' share of each of those."""
    evictable = valid & evictable
    heads = evictable.shape[1]
    if layer_scope:
        if combine is None:  # not ``combine or ...``: torch 2.11's dynamo cannot take a bound method's truth
            combine = lambda tensor, how: tensor  # noqa: E731
        evictable = combine(evictable.all(1, keepdim=True).to(torch.int32), "min").bool()
    window = recent_window
    if cap_window:
        window = window_cap(evictable.sum(-1, keepdim=True)).clamp_max(recent_window)
    recent = positions >= seen - window
    score = eviction_score(score_kind, importance, normalizer, positions, seen, decode_len, seed)
    if not layer_scope:
        return keep_rank(score, positions, recent).masked_fill(~evictable, float("inf"))
    recent = combine((evictable & recent).any(1, keepdim=True).to(torch.int32), "max").bool()
    score = combine(score.sum(1, keepdim=True), "sum") / (heads * ranks)
    age = combine(positions.to(torch.float32).sum(1, keepdim=True), "sum") / (heads * ranks)
    return keep_rank(score, age, recent).masked_fill(~evictable, float("inf")).expand(-1, heads, -1)


def sink_mask(valid: Tensor, sinks: int) -> Tensor:
    """The first ``sinks`` valid tokens of each row (never evicted, never compressed away)."""
    return valid & (valid.cumsum(-1) <= sinks)


def prompt_score(score_kind: int, importance: Tensor, normalizer: Tensor, key_valid: Tensor, seed: int,
                 carry: int = 0) -> Tensor:
    """Selection score [B, H, L] of prompt tokens from their prefill scores, read as decode eviction would read
    them with the whole prompt seen, each raised to the best of the ``carry`` before it (padding scores 0)."""
    b, h, length = importance.shape
    positions = torch.arange(length, device=importance.device).expand(b, h, length)
    seen = torch.full((), length, dtype=torch.int64, device=importance.device)
    draw = torch.zeros((), dtype=torch.int64, device=importance.device)
    padding = ~key_valid[:, None, :]  # masked before the carry (left padding) and after it (right padding)
    score = eviction_score(score_kind, importance, normalizer, positions, seen, draw, seed)
    return carry_forward(score.masked_fill(padding, 0.0), carry).masked_fill(padding, 0.0)


def carry_forward(score: Tensor, span: int) -> Tensor:
    """Each score [..., L] raised to the best of the ``span`` scores before it: a fact is kept whole after the
    token the question matched (at 2k tokens the multi-key needle's key was kept and its value never)."""
    if span == 0:
        return score
    return torch.nn.functional.pad(score, (span, 0)).unfold(-1, span + 1, 1).amax(-1)


def head_share(score: Tensor) -> Tensor:
    """Each score [B, H, L] as a share of its head's total: comparable across heads and layers."""
    return score / score.sum(-1, keepdim=True).clamp_min(1e-20)


def vote(scores: list[Tensor], sum_over_ranks: Callable[[Tensor], Tensor] | None = None, ranks: int = 1) -> Tensor:
    """[B, L]: the voting layers' prompt scores [B, H, L], each head's as a share of its total, averaged over heads
    and layers. Under tensor parallelism each of ``ranks`` ranks holds some heads: ``sum_over_ranks`` adds up
    the ranks' sums, so that every rank gets the vote of all heads."""
    total = torch.stack([head_share(score).sum(1) for score in scores]).sum(0)
    if sum_over_ranks is not None:
        total = sum_over_ranks(total)
    return total / (len(scores) * scores[0].shape[1] * ranks)


def select_prompt(score: Tensor, valid: Tensor, slots: int, sinks: int, recent_window: int,
                  vote_weight: float = 0.0, model_vote: Tensor | None = None) -> Tensor:
    """Indices [B, H, slots], ascending, of the prompt tokens kept when a prompt of L > ``slots`` tokens is
    compressed: the keep order over score [B, H, L] (blended with ``model_vote`` [B, L] at ``vote_weight``);
    valid bool [B, H, L]. The window covers at most :func:`window_cap` of the ``slots - sinks`` choosable slots."""
    if model_vote is not None:
        score = (1 - vote_weight) * head_share(score) + vote_weight * model_vote[:, None, :]
    length = score.shape[-1]
    positions = torch.arange(length, device=score.device).expand_as(score)
    window = min(recent_window, window_cap(slots - sinks))
    rank = keep_rank(score, positions, positions >= length - window, sink_mask(valid, sinks))
    return rank.masked_fill(~valid, float("-inf")).topk(slots, dim=-1).indices.sort(dim=-1).values
