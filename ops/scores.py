"""Eviction scores: lower goes first. One function for every policy, shared by decode and prefill."""

from __future__ import annotations

import torch
from torch import Tensor

MOMENTUM, WINDOW, RANDOM = 0, 1, 2


def hash_uniform(positions: Tensor, step: Tensor, seed: int) -> Tensor:
    """Deterministic pseudo-random score in [0, 1) per (batch, head, slot): graph- and kernel-friendly."""
    b, h, s = positions.shape
    lane = torch.arange(b * h, device=positions.device, dtype=torch.int64).view(b, h, 1)
    x = positions * 0x9E3779B1 + step * 0x85EBCA77 + lane * 0x27D4EB2F + seed
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
    step: Tensor,
    bias_correction: bool,
    seed: int,
) -> Tensor:
    """Score [B, H, S] fp32 of each slot under ``policy``; the lowest candidate is evicted."""
    if policy == MOMENTUM:
        if bias_correction:
            return importance / normalizer.clamp_min(1e-20)
        return importance
    if policy == WINDOW:
        return positions.to(torch.float32)
    if policy == RANDOM:
        return hash_uniform(positions, step, seed)
    raise ValueError(f"policy id must be 0 (momentum), 1 (window) or 2 (random), got {policy}")
