"""``momentkv::prefill_scores``: momentum state of prompt tokens from the last prompt queries.

SnapKV-style: the last ``W`` queries of the prompt score every prompt key; the
momentum recurrence runs over them, so a prompt token enters decoding with the
same kind of score a decode token has. Used to compress the prompt to a prefill
budget and to let prompt tokens compete with decode tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import soft_cap


def prefill_attention(query: Tensor, keys: Tensor, key_valid: Tensor, scale: float,
                      softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """query [B, Hq, W, Dk]: the last W prompt queries; keys [B, Hkv, L, Dk]; key_valid bool [B, L]; softcap: the
    logits' soft cap (0: none).

    Query t sits at position L - W + t and sees keys up to it (causal) that are valid. Returns each query's
    attention probabilities fp32 [B, Hkv, W, L], averaged over the GQA group, and which keys it sees, bool
    [B, W, L]: what a registered rule is given at each observation query (``patches/rule.py``)."""
    b, hq, w, dk = query.shape
    hkv, length = keys.shape[1], keys.shape[2]
    q = query.float().view(b, hkv, hq // hkv, w, dk)
    logits, _ = soft_cap(torch.einsum("bhgtd,bhld->bhgtl", q, keys.float()) * scale, softcap)
    query_pos = torch.arange(length - w, length, device=keys.device)
    visible = (torch.arange(length, device=keys.device)[None, :] <= query_pos[:, None])[None] & key_valid[:, None, :]
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    peak = logits.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(logits - peak)
    probs = (weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).mean(dim=2)
    return probs, visible


def prefill_scores_reference(
    query: Tensor, keys: Tensor, key_valid: Tensor, scale: float, alpha: float, softcap: float = 0.0
) -> tuple[Tensor, Tensor]:
    """As :func:`prefill_attention`; returns (importance, normalizer), fp32 [B, Hkv, L]: the momentum recurrence
    over the W queries, sum_t alpha^(W-1-t) p_t, and the same over [key visible to t].
    The plain-PyTorch kernel: runs on every device and is the reference for the others."""
    b, hkv, length, w = keys.shape[0], keys.shape[1], keys.shape[2], query.shape[2]
    probs, visible = prefill_attention(query, keys, key_valid, scale, softcap)
    decay = torch.pow(torch.full((w,), alpha, device=keys.device), torch.arange(w - 1, -1, -1, device=keys.device))
    importance = torch.einsum("t,bhtl->bhl", decay, probs)
    normalizer = torch.einsum("t,btl->bl", decay, visible.float())[:, None].expand(b, hkv, length).contiguous()
    return importance, normalizer


prefill_scores = torch.library.custom_op("momentkv::prefill_scores", prefill_scores_reference, mutates_args=())


@prefill_scores.register_fake
def _(query, keys, key_valid, scale, alpha, softcap=0.0):
    shape = (keys.shape[0], keys.shape[1], keys.shape[2])
    return keys.new_empty(shape, dtype=torch.float32), keys.new_empty(shape, dtype=torch.float32)
