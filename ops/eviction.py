"""``momentkv::evict``: when the decode region is over budget, drop each head's lowest-scored slot.

The victim is folded into the moments and its slot becomes the next write target.
Nothing is branched on the host: before the budget is reached the op is a masked no-op,
so one compiled decode step serves every step of a generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .moments import fold_range, fold_token
from .selection import eviction_rank
from .signature import define


def evict_reference(*, keys: Tensor, values: Tensor, valid: Tensor, n: Tensor, mu_k: Tensor, mu_v: Tensor,
                    comoment: Tensor, value_range: Tensor, free_slot: Tensor, decode_len: Tensor, budget: int,
                    moments: bool, rank: Tensor | None, **named: Any) -> None:
    """keys [B, H, S, Dk], values [B, H, S, Dv]; valid bool [B, H, S]; moments as in decode_attention;
    free_slot int64 [B, H]; decode_len int64 scalar (decode tokens written); the rest as ``eviction_rank`` reads it.

    Evicts iff ``decode_len > budget``: the valid, evictable slot last in the keep order
    (``selection.eviction_rank``): the lowest-scored one older than the ``recent_window`` newest tokens, or,
    if every evictable slot lies in the window, the oldest. ``moments`` folds it into the moments (and its
    value into ``value_range``). ``rank`` [B, H, S] float64, if given, replaces the op's own
    ``eviction_rank`` (tensor parallelism with ``layer_scope``: the rank over every rank's heads).
    The plain-PyTorch kernel: runs on every device and is the reference for the others."""
    if rank is None:
        rank = eviction_rank(valid=valid, decode_len=decode_len, **named)
    victim = rank.argmin(dim=-1)
    gate = (decode_len > budget) & torch.isfinite(rank).any(dim=-1)
    slot = victim[..., None]
    valid.scatter_(-1, slot, valid.gather(-1, slot) & ~gate[..., None])
    free_slot.copy_(torch.where(gate, victim, free_slot))
    if moments:
        k = keys.gather(2, slot[..., None].expand(-1, -1, 1, keys.shape[-1])).squeeze(2)
        v = values.gather(2, slot[..., None].expand(-1, -1, 1, values.shape[-1])).squeeze(2)
        fold_token(n, mu_k, mu_v, comoment, k, v, gate)
        fold_range(value_range, v, gate)


MUTATES = ("valid", "n", "mu_k", "mu_v", "comoment", "value_range", "free_slot")
evict = define("evict", evict_reference, mutates=MUTATES, attends=False)
