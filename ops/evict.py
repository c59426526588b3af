"""``momentkv::evict``: when the decode region is over budget, drop each head's lowest-scored slot.

The victim is folded into the moments and its slot becomes the next write target.
Nothing is branched on the host: before the budget is reached the op is a masked no-op,
so one compiled decode step serves every step of a generation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moments import fold_range, fold_token
from .selection import eviction_rank


def evict_reference(
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    evictable: Tensor,
    importance: Tensor,
    normalizer: Tensor,
    positions: Tensor,
    n: Tensor,
    mu_k: Tensor,
    mu_v: Tensor,
    comoment: Tensor,
    free_slot: Tensor,
    decode_len: Tensor,
    seen: Tensor,
    budget: int,
    policy: int,
    bias_correction: bool,
    recent_window: int,
    cap_window: bool,
    shared: bool,
    seed: int,
    fold: bool,
    value_range: Tensor | None = None,
    rank: Tensor | None = None,
) -> None:
    """keys [B, H, S, Dk], values [B, H, S, Dv]; valid, evictable bool [B, H, S]; importance,
    normalizer fp32 [B, H, S]; positions int64 [B, H, S]; moments as in decode_attention;
    free_slot int64 [B, H]; decode_len, seen int64 scalars (decode tokens written, tokens seen).

    Evicts iff ``decode_len > budget``: the valid, evictable slot last in the keep order
    (``selection.keep_rank``): the lowest-scored one older than the ``recent_window`` newest tokens, or,
    if every evictable slot lies in the window, the oldest. With ``cap_window`` the window covers at most
    ``window_cap(m)`` of the ``m`` evictable slots a head holds (with ``shared``, that every head holds),
    so the score always chooses among some. ``shared`` averages scores over heads and evicts one slot
    per sequence in every head. ``fold`` keeps the moments (off when no correction is used), and
    ``value_range`` [B, H, 2, Dv], if given, the range of the evicted values. ``rank`` [B, H, S] float64, if
    given, replaces the op's own ``selection.eviction_rank`` (tensor parallelism with ``shared``: the rank
    over every rank's heads).
    The plain-PyTorch kernel: runs on every device and is the reference for the others."""
    if rank is None:
        rank = eviction_rank(policy, importance, normalizer, positions, valid, evictable, seen, decode_len,
                             bias_correction, seed, recent_window, cap_window, shared)
    victim = rank.argmin(dim=-1)
    gate = (decode_len > budget) & torch.isfinite(rank).any(dim=-1)
    slot = victim[..., None]
    valid.scatter_(-1, slot, valid.gather(-1, slot) & ~gate[..., None])
    free_slot.copy_(torch.where(gate, victim, free_slot))
    if fold:
        k = keys.gather(2, slot[..., None].expand(-1, -1, 1, keys.shape[-1])).squeeze(2)
        v = values.gather(2, slot[..., None].expand(-1, -1, 1, values.shape[-1])).squeeze(2)
        fold_token(n, mu_k, mu_v, comoment, k, v, gate)
        if value_range is not None:
            fold_range(value_range, v, gate)


evict = torch.library.custom_op(
    "momentkv::evict", evict_reference, mutates_args=("valid", "n", "mu_k", "mu_v", "comoment", "free_slot", "value_range")
)


@evict.register_fake
def _(keys, values, valid, evictable, importance, normalizer, positions, n, mu_k, mu_v, comoment, free_slot,
      decode_len, seen, budget, policy, bias_correction, recent_window, cap_window, shared, seed, fold,
      value_range=None, rank=None):
    return None
