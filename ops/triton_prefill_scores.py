"""Triton kernel of ``momentkv::prefill_scores``: two passes over the prompt keys.

Pass 1, per (sequence, KV head, observation query): the softmax max and sum over the keys
that query sees. Pass 2, per block of keys: each query's probabilities, averaged over the
GQA group, accumulate with weight alpha^(W-1-t) into the key's score and normaliser.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import dots_in_fp32, soft_cap

BLOCK_L = 64


@triton.jit
def _logits(Q, K, b, h, t, s, smask, ok_key, L, W, scale, softcap, sqb, sqh, sqt, skb, skh, skl,
            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, FP32: tl.constexpr, CAPPED: tl.constexpr):
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + t * sqt + d[None, :], mask=gmask[:, None], other=0.0)
    k = tl.load(K + b * skb + h * skh + s[:, None] * skl + d[None, :], mask=smask[:, None], other=0.0)
    if FP32:
        logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    else:
        logits = tl.dot(q, tl.trans(k)) * scale
    if CAPPED:
        logits, _ = soft_cap(logits, softcap)
    visible = ok_key & (s <= L - W + t)
    return tl.where(visible[None, :] & gmask[:, None], logits, float("-inf")), visible


@triton.jit
def _stats_kernel(Q, K, KEY_VALID, STAT_M, STAT_L, L, W, scale, softcap, sqb, sqh, sqt, skb, skh, skl,
                  HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                  FP32: tl.constexpr, CAPPED: tl.constexpr):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for s0 in range(0, L - W + t + 1, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        smask = s < L
        ok_key = tl.load(KEY_VALID + b * L + s, mask=smask, other=0) != 0
        logits, _ = _logits(Q, K, b, h, t, s, smask, ok_key, L, W, scale, softcap, sqb, sqh, sqt, skb, skh, skl,
                            G, BLOCK_G, D, FP32, CAPPED)
        m_new = tl.maximum(m, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), 1)
        m = m_new
    g = tl.arange(0, BLOCK_G)
    tl.store(STAT_M + (bh * W + t) * BLOCK_G + g, tl.where(m == float("-inf"), 0.0, m))
    tl.store(STAT_L + (bh * W + t) * BLOCK_G + g, tl.maximum(l, 1.1754943508222875e-38))


@triton.jit
def _scores_kernel(Q, K, KEY_VALID, STAT_M, STAT_L, DECAY, IMP, NORM, L, W, scale, softcap,
                   sqb, sqh, sqt, skb, skh, skl,
                   HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                   FP32: tl.constexpr, CAPPED: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    smask = s < L
    ok_key = tl.load(KEY_VALID + b * L + s, mask=smask, other=0) != 0
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    imp = tl.zeros([BLOCK], tl.float32)
    norm = tl.zeros([BLOCK], tl.float32)
    for t in range(0, W):
        weight = tl.load(DECAY + t)
        logits, visible = _logits(Q, K, b, h, t, s, smask, ok_key, L, W, scale, softcap, sqb, sqh, sqt, skb, skh, skl,
                                  G, BLOCK_G, D, FP32, CAPPED)
        m = tl.load(STAT_M + (bh * W + t) * BLOCK_G + g)
        total = tl.load(STAT_L + (bh * W + t) * BLOCK_G + g)
        p = tl.exp(logits - m[:, None]) / total[:, None]
        imp += weight * tl.sum(tl.where(gmask[:, None], p, 0.0), 0) / G
        norm += weight * visible.to(tl.float32)
    tl.store(IMP + bh * L + s, imp, mask=smask)
    tl.store(NORM + bh * L + s, norm, mask=smask)


def prefill_scores_triton(query: Tensor, keys: Tensor, key_valid: Tensor, scale: float,
                          alpha: float, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Same contract as the reference ``prefill_scores``."""
    b, hq, w, d = query.shape
    hkv, length = keys.shape[1], keys.shape[2]
    g = hq // hkv
    block_g = max(16, triton.next_power_of_2(g))
    query, keys = query.contiguous(), keys.contiguous()
    key_valid = key_valid.contiguous().view(torch.uint8)
    f32 = dict(dtype=torch.float32, device=query.device)
    stat_m = torch.empty(b * hkv, w, block_g, **f32)
    stat_l = torch.empty(b * hkv, w, block_g, **f32)
    importance = torch.empty(b, hkv, length, **f32)
    normalizer = torch.empty(b, hkv, length, **f32)
    decay = torch.pow(torch.full((w,), alpha, **f32), torch.arange(w - 1, -1, -1, device=query.device))
    strides = (query.stride(0), query.stride(1), query.stride(2), keys.stride(0), keys.stride(1), keys.stride(2))
    meta = dict(HKV=hkv, G=g, BLOCK_G=block_g, D=d, BLOCK=BLOCK_L, FP32=dots_in_fp32(query.dtype),
                CAPPED=bool(softcap))
    cap = softcap or 1.0  # read only when CAPPED
    _stats_kernel[(b * hkv, w)](query, keys, key_valid, stat_m, stat_l, length, w, scale, cap, *strides, **meta)
    _scores_kernel[(b * hkv, triton.cdiv(length, BLOCK_L))](
        query, keys, key_valid, stat_m, stat_l, decay, importance, normalizer, length, w, scale, cap, *strides,
        **meta)
    return importance, normalizer
