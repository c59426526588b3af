"""Eviction scores: lower goes first. One function for every policy, shared by decode and prefill."""

from __future__ import annotations

import torch
from torch import Tensor

MOMENTUM, WINDOW, RANDOM = 0, 1, 2


def hash_uniform(age: Tensor, draw: Tensor, seed: int) -> Tensor:
    """Deterministic pseudo-random score in [0, 1) per (batch, head, slot): graph- and kernel-friendly.

    It hashes what a row alone sees the same way in any batch and with any left padding: each slot's
    age (tokens since it), the draw (decode steps so far), the KV head and the seed; never the row index
    or an absolute position."""
    head = torch.arange(age.shape[1], device=age.device, dtype=torch.int64).view(1, -1, 1)
    x = age * 0x9E3779B1 + draw * 0x85EBCA77 + head * 0x27D4EB2F + seed
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    return (x & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def eviction_score(
    policy: int,
    importance: Tensor,
    normalizer: Tensor,
    positions: Tensor,
    seen: Tensor,
    draw: Tensor,
    bias_correction: bool,
    seed: int,
) -> Tensor:
    """Score [B, H, S] fp32 of each slot under ``policy``; the lowest candidate is evicted.

    seen: tokens seen (an int64 scalar); draw: decode steps so far (0 at prefill), which varies the random policy."""
    if policy == MOMENTUM:
        if bias_correction:
            return importance / normalizer.clamp_min(1e-20)
        return importance
    if policy == WINDOW:
        return positions.to(torch.float32)
    if policy == RANDOM:
        return hash_uniform(seen - positions, draw, seed)
    raise ValueError(f"policy id must be 0 (momentum), 1 (window) or 2 (random), got {policy}")
