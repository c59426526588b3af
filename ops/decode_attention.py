"""``momentkv::decode_attention``: one query per sequence against the budgeted slots.

Exact softmax attention over the valid slots, merged (log-sum-exp) with the
evicted set's virtual key from its moments, and, fused, the momentum update of
each slot's score with the probability it received (averaged over the GQA group).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("momentkv::decode_attention", mutates_args=("importance", "normalizer"))
def decode_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    n: Tensor,
    mu_k: Tensor,
    mu_v: Tensor,
    comoment: Tensor,
    importance: Tensor,
    normalizer: Tensor,
    scale: float,
    alpha: float,
    corrected: bool,
) -> Tensor:
    """query [B, Hq, Dk]; keys [B, Hkv, S, Dk]; values [B, Hkv, S, Dv]; valid bool [B, Hkv, S];
    moments n [B, Hkv], mu_k [B, Hkv, Dk], mu_v [B, Hkv, Dv], comoment [B, Hkv, Dv, Dk] (fp32);
    importance, normalizer fp32 [B, Hkv, S], updated in place: I = alpha I + p, Z = alpha Z + 1 on valid slots.
    Returns the attention output [B, Hq, Dv] in the query's dtype.

    This body is the plain-PyTorch kernel (every device; the reference for the others)."""
    b, hq, dk = query.shape
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, dk)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.float()) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    if corrected:
        count = n.clamp_min(1.0)
        virtual_logit = torch.log(count)[..., None] + scale * torch.einsum("bhgd,bhd->bhg", q, mu_k)
        virtual_logit = virtual_logit.masked_fill((n <= 0)[..., None], float("-inf"))
        logits = torch.cat([logits, virtual_logit[..., None]], dim=-1)
    peak = logits.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(logits - peak)
    total = weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    slots = keys.shape[2]
    out = torch.einsum("bhgs,bhsv->bhgv", weights[..., :slots], values.float())
    if corrected:
        # sum_j exp(s q.k_j) v_j ~= exp(s q.mu_k) (n mu_v + s C q) = w_E (mu_v + (s / n) C q)
        virtual_value = mu_v[:, :, None, :] + (scale / n.clamp_min(1.0))[..., None, None] * torch.einsum(
            "bhvk,bhgk->bhgv", comoment, q
        )
        out = out + weights[..., slots:] * virtual_value
    out = out / total
    probs = (weights[..., :slots] / total).mean(dim=2)
    importance.copy_(torch.where(valid, alpha * importance + probs, importance))
    normalizer.copy_(torch.where(valid, alpha * normalizer + 1.0, normalizer))
    return out.reshape(b, hq, -1).to(query.dtype)


@decode_attention.register_fake
def _(query, keys, values, valid, n, mu_k, mu_v, comoment, importance, normalizer, scale, alpha, corrected):
    return query.new_empty(query.shape[0], query.shape[1], values.shape[-1])
