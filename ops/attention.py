"""``momentkv::decode_attention``: one query per sequence against the budgeted slots.

Exact softmax attention over the valid slots, merged (log-sum-exp) with the
evicted set's virtual key from its moments and with the model's learned attention
sinks (a per-head logit in the normaliser with no value, as gpt-oss has), and, fused,
the momentum update of each slot's score with the probability it received (averaged
over the GQA group).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .signature import define


# Compiled, a product of fewer multiply-adds than this is fused (SmolLM2's query against 577 slots: 332k at batch 1).
FUSED_PRODUCT_BELOW = 2**20


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for the decode shapes (a few queries per head). Compiled, a small product is written as a broadcast
    product and sum, which fuses into the loops around it (inductor lowers a matmul to a BLAS call of ~18 us, more
    than a batch-1 product). A larger one is a matmul: inductor stores a BLAS call's inputs, where fused into the
    model's graph it recomputed the query's rotary embedding (cos and sin) for every slot, inductor counting neither
    as worth storing on CPU (SmolLM2, batch 64: 416 against 321 ms a compiled step; the eager op as fast either way).
    Eager, the matmul: the broadcast would materialise [.., M, K, N]."""
    if torch.compiler.is_compiling() and a.numel() * b.shape[-1] < FUSED_PRODUCT_BELOW:
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return torch.matmul(a, b)


def soft_cap(logits: Tensor, softcap: float) -> tuple[Tensor, Tensor | float]:
    """Gemma 2's attention-logit soft cap ``c tanh(x / c)`` (``softcap`` 0: none), and its slope
    ``1 - tanh(x / c)^2``, the derivative the moments' first-order term takes through the cap."""
    if not softcap:
        return logits, 1.0
    bounded = torch.tanh(logits / softcap)
    return bounded * softcap, 1.0 - bounded * bounded


def decode_attention_reference(*, query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, n: Tensor,
                               mu_k: Tensor, mu_v: Tensor, comoment: Tensor, value_range: Tensor, importance: Tensor,
                               normalizer: Tensor, scale: float, alpha: float, moments: bool,
                               moment_weight: float, sink_logits: Tensor | None, softcap: float = 0.0,
                               **_: Any) -> Tensor:
    """query [B, Hq, Dk]; keys [B, Hkv, S, Dk]; values [B, Hkv, S, Dv]; valid bool [B, Hkv, S];
    moments n [B, Hkv], mu_k [B, Hkv, Dk], mu_v [B, Hkv, Dv], comoment [B, Hkv, Dv, Dk] (fp32);
    importance, normalizer fp32 [B, Hkv, S], updated in place: I = alpha I + p, Z = alpha Z + 1 on valid slots;
    sink_logits [Hq] (optional): each query head's learned sink logit, which takes a share of the softmax and gives
    nothing; value_range fp32 [B, Hkv, 2, Dv]: low and high of the evicted values, which bound the virtual value;
    moments: whether the evicted set is attended as a virtual key; softcap: the logits' soft cap c (0: none), each
    logit x read as c tanh(x / c). The other parameters are ignored.
    Returns the attention output [B, Hq, Dv] in the query's dtype.

    The plain-PyTorch kernel: runs on every device and is the reference for the others."""
    b, hq, dk = query.shape
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, dk)
    logits, _ = soft_cap(_matmul(q, keys.float().transpose(-1, -2)).mul_(scale), softcap)
    logits.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    peak = logits.amax(-1, keepdim=True)
    if moments:
        # The evicted set as one virtual key: log-weight log n + f(s q.mu_k) (first order around mu_k; f the cap).
        empty = (n <= 0)[..., None, None]
        mean_logit, slope = soft_cap(_matmul(q, mu_k.unsqueeze(-1)).mul_(scale), softcap)
        mean_logit = mean_logit.masked_fill(empty, float("-inf"))
        virtual_logit = mean_logit + torch.log(n.clamp_min(1.0))[..., None, None]
        peak = torch.maximum(peak, virtual_logit)
    if sink_logits is not None:
        sink_logit = sink_logits.float().view(1, hkv, hq // hkv, 1)
        peak = torch.maximum(peak, sink_logit)
    peak.clamp_(min=torch.finfo(torch.float32).min)  # a row with nothing to attend gives 0, not NaN
    weights = torch.exp(logits - peak)
    total = weights.sum(-1, keepdim=True)
    out = _matmul(weights, values.float())
    if moments:
        # sum_j exp(f(s q.k_j)) v_j ~= exp(f(m)) (n mu_v + f'(m) s C q) = w_E (mu_v + f'(m) (s / n) C q),
        # m = s q.mu_k (f the identity without a cap)
        virtual_weight = torch.exp(virtual_logit - peak)
        total = total + virtual_weight
        first_order = _matmul(q, comoment.transpose(-1, -2)).mul_((scale / n.clamp_min(1.0))[..., None, None] * slope)
        virtual_value = first_order + mu_v.unsqueeze(2)
        # The evicted set's true contribution is a weighted mean of its values, so within their range;
        # the first-order term is not (it grows with the logits and overflowed fp16 at large ones).
        virtual_value = torch.minimum(torch.maximum(virtual_value, value_range[:, :, :1]), value_range[:, :, 1:])
        out = out + virtual_weight * virtual_value
    if sink_logits is not None:
        total = total + torch.exp(sink_logit - peak)
    total.clamp_(min=torch.finfo(torch.float32).tiny)
    out = out / total
    probs = weights / total
    if moments and moment_weight:
        # What eviction would lose once the moments stand in: p_j minus its first-order
        # estimate p_mu (1 + x_j), x_j = f(s q.k_j) - f(s q.mu_k); exp(x) >= 1 + x keeps it >= 0.
        p_mean = torch.exp(mean_logit - peak) / total
        estimate = p_mean * (1.0 + logits - mean_logit)
        probs = probs - moment_weight * torch.where((weights > 0) & ~empty, estimate, 0.0)
    probs = probs.mean(dim=2)
    importance.copy_(torch.where(valid, importance * alpha + probs, importance))
    normalizer.copy_(torch.where(valid, normalizer * alpha + 1.0, normalizer))
    return out.reshape(b, hq, -1).to(query.dtype)


MUTATES = ("importance", "normalizer")
decode_attention = define("decode_attention", decode_attention_reference, mutates=MUTATES, attends=True)
