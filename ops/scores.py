"""Eviction scores: lower goes first. One function for every kind of score a fused kernel reads, shared by
decode and prefill.

A kernel does not know rules by name: it reads a slot's score one of four ways (``score_kind``). The
built-in rules (``momentkv.policies``) say which; a registered rule without a kernel of its own keeps its
score in ``importance`` and is read as stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

# How a fused kernel reads each slot's score: as stored (a registered rule's score; momentum without bias
# correction), stored over its normaliser (bias-corrected momentum), by position (newest kept), or as a hash.
STORED, NORMALIZED, POSITION, HASH = 0, 1, 2, 3
SCORE_KINDS = (STORED, NORMALIZED, POSITION, HASH)

HASH_BITS = 24  # hash_uniform keeps this many bits: scores are multiples of 2**-24 in [0, 1)


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
    return (x & ((1 << HASH_BITS) - 1)).to(torch.float32) / float(1 << HASH_BITS)


def eviction_score(score_kind: int, importance: Tensor, normalizer: Tensor, positions: Tensor, seen: Tensor,
                   draw: Tensor, seed: int) -> Tensor:
    """Score [B, H, S] fp32 of each slot read as ``score_kind``; the lowest candidate is evicted.

    seen: tokens seen (an int64 scalar); draw: decode steps so far (0 at prefill), which varies the hash."""
    if score_kind == STORED:
        return importance
    if score_kind == NORMALIZED:
        return importance / normalizer.clamp_min(1e-20)
    if score_kind == POSITION:
        return positions.to(torch.float32)
    if score_kind == HASH:
        return hash_uniform(seen - positions, draw, seed)
    raise ValueError(f"score_kind must be one of {SCORE_KINDS} (stored, normalized, position, hash), got {score_kind}")
