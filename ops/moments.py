"""Running moments of the evicted set: count, key mean, value mean, value-key co-moment.

Kept in fp32 and updated incrementally (Welford for one token, Chan's merge for
a batch), so they stay exact after thousands of folds. Beside them, the per-dimension range
of the evicted values (with 0, where the buffer starts), which bounds the first-order estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fold_token(n: Tensor, mu_k: Tensor, mu_v: Tensor, comoment: Tensor, k: Tensor, v: Tensor, gate: Tensor) -> None:
    """Fold one token per (batch, head) into the moments, in place, where ``gate`` is True.

    n: [B, H]; mu_k, k: [B, H, Dk]; mu_v, v: [B, H, Dv]; comoment: [B, H, Dv, Dk]; gate: bool [B, H].
    """
    g = gate.to(torch.float32)
    n_new = n + g
    inv = g / n_new.clamp_min(1.0)
    dk = k.float() - mu_k
    dv = v.float() - mu_v
    mu_k_new = mu_k + dk * inv[..., None]
    mu_v.add_(dv * inv[..., None])
    # Welford co-moment: (v - old mean_v) (k - new mean_k)^T
    comoment.add_(g[..., None, None] * dv[..., :, None] * (k.float() - mu_k_new)[..., None, :])
    mu_k.copy_(mu_k_new)
    n.copy_(n_new)


def merge_set(
    n: Tensor, mu_k: Tensor, mu_v: Tensor, comoment: Tensor, keys: Tensor, values: Tensor, mask: Tensor
) -> None:
    """Merge the tokens of ``keys``/``values`` [B, H, L, D] selected by ``mask`` [B, H, L] into the moments (Chan)."""
    w = mask.to(torch.float32)
    nb = w.sum(-1)
    kf, vf = keys.float(), values.float()
    denom = nb.clamp_min(1.0)[..., None]
    mk = (w[..., None] * kf).sum(-2) / denom
    mv = (w[..., None] * vf).sum(-2) / denom
    cb = torch.einsum("bhl,bhlv,bhlk->bhvk", w, vf - mv[..., None, :], kf - mk[..., None, :])
    total = n + nb
    safe = total.clamp_min(1.0)
    dk, dv = mk - mu_k, mv - mu_v
    comoment.add_(cb + (n * nb / safe)[..., None, None] * dv[..., :, None] * dk[..., None, :])
    mu_k.add_(dk * (nb / safe)[..., None])
    mu_v.add_(dv * (nb / safe)[..., None])
    n.copy_(total)


def fold_range(value_range: Tensor, v: Tensor, gate: Tensor) -> None:
    """Widen ``value_range`` [B, H, 2, Dv] (low, high) to hold ``v`` [B, H, Dv] where ``gate`` [B, H] is True."""
    v = v.float()
    low = torch.where(gate[..., None], torch.minimum(value_range[:, :, 0], v), value_range[:, :, 0])
    high = torch.where(gate[..., None], torch.maximum(value_range[:, :, 1], v), value_range[:, :, 1])
    value_range.copy_(torch.stack([low, high], dim=2))


def merge_range(value_range: Tensor, values: Tensor, mask: Tensor) -> None:
    """Widen ``value_range`` to hold the ``values`` [B, H, L, Dv] selected by ``mask`` [B, H, L]."""
    v = values.float()
    low = v.masked_fill(~mask[..., None], float("inf")).amin(-2)
    high = v.masked_fill(~mask[..., None], float("-inf")).amax(-2)
    value_range.copy_(torch.stack([torch.minimum(value_range[:, :, 0], low),
                                   torch.maximum(value_range[:, :, 1], high)], dim=2))
