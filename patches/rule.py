"""A registered rule (``momentkv.policies``) run on a budgeted layer's slots, for rules without a fused kernel:
after each decode step's attention, and over the observation queries when the prompt is scored."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from momentkv.ops.prefill import prefill_attention
from momentkv.ops.state import LayerState


def held_keys(keys: Tensor, valid: Tensor) -> Tensor:
    """Each slot's key, zero where the slot holds no token (a rule's ``key``)."""
    return torch.where(valid[..., None], keys, torch.zeros((), dtype=keys.dtype, device=keys.device))


def decode_scores(rule: Callable, state: LayerState, attention: Tensor) -> None:
    """Update ``state.importance`` with the rule's new score of every slot holding a token; ``attention`` [B, H, S]:
    the probability this step's query gave each slot (the normaliser is already updated)."""
    score = rule(state.importance, attention, state.positions, held_keys(state.keys, state.valid), state.decode_len,
                 seen=state.seen, normalizer=state.normalizer)
    state.importance.copy_(torch.where(state.valid, score, state.importance))


def prompt_scores(rule: Callable, query: Tensor, keys: Tensor, key_valid: Tensor, scale: float, alpha: float,
                  softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """(score, normalizer) fp32 [B, H, L] of the prompt keys [B, H, L, Dk]: the rule run over the last prompt
    queries [B, Hq, W, Dk] in order, each updating the keys it sees (key_valid bool [B, L]), as decoding would."""
    probs, visible = prefill_attention(query, keys, key_valid, scale, softcap)
    b, h, length = keys.shape[0], keys.shape[1], keys.shape[2]
    window = query.shape[2]
    score = torch.zeros(b, h, length, dtype=torch.float32, device=keys.device)
    normalizer = torch.zeros_like(score)
    positions = torch.arange(length, device=keys.device).expand(b, h, length)
    held = held_keys(keys, key_valid[:, None, :].expand(b, h, length))
    step = torch.zeros((), dtype=torch.int64, device=keys.device)
    for t in range(window):
        sees = visible[:, None, t]
        normalizer = torch.where(sees, alpha * normalizer + 1.0, normalizer)
        seen = torch.full((), length - window + t + 1, dtype=torch.int64, device=keys.device)
        new = rule(score, probs[:, :, t], positions, held, step, seen=seen, normalizer=normalizer)
        score = torch.where(sees, new, score)
    return score, normalizer
