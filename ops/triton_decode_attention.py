"""Triton kernel of ``momentkv::decode_attention``: split-K (flash-decoding) over the slots.

Three launches: (1) each (sequence, KV head, split) attends its GQA group's queries to a
range of slots with an online softmax, keeping the logits (soft-capped where the model caps them); (2) per
(sequence, KV head)
the splits merge with the evicted set's virtual key through log-sum-exp; (3) per block of
slots, the final probabilities, averaged over the group, update the momentum scores.
K and V are read once; the logits add G fp32 per slot (a few percent of K/V traffic).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import decode_attention_reference
from .triton_support import dots_in_fp32, soft_cap, tiles

TARGET_PROGRAMS = 264  # about two waves on an H100's 132 SMs
MAX_SPLITS = 64
MOMENTUM_BLOCK = 64
FLOAT32_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # the reference's clamp of the normaliser


def launch_config(batch: int, kv_heads: int, slots: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and split count for a shape: shared memory stays under Hopper's 227 KB per block
    (a 64-slot block of fp32 keys and values at head_dim 256 would need 282 KB)."""
    fp32 = dots_in_fp32(dtype)
    block = 64 if head_dim * (4 if fp32 else 2) <= 512 else 32
    blocks = triton.cdiv(slots, block)
    splits = max(1, min(blocks, MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, batch * kv_heads)))
    split = triton.cdiv(blocks, splits) * block
    splits = triton.cdiv(slots, split)
    ns_p2 = triton.next_power_of_2(splits)
    return dict(block=block, split=split, splits=splits, ns_p2=ns_p2, fp32=fp32,
                block_dv=min(head_dim, max(16, 1024 // ns_p2)))


@triton.jit
def _split_kernel(Q, K, V, VALID, LOGITS, PART_M, PART_L, PART_ACC,
                  S, SPLIT, NS, scale, softcap,
                  sqb, sqh, skb, skh, sks, svb, svh, svs, sab, sah,
                  HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK: tl.constexpr, FP32: tl.constexpr, CAPPED: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    gmask = g < G
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DV], tl.float32)
    start = split * SPLIT
    for s0 in range(start, start + SPLIT, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        smask = s < S
        ok = tl.load(VALID + b * sab + h * sah + s, mask=smask, other=0) != 0
        k = tl.load(K + b * skb + h * skh + s[:, None] * sks + d[None, :], mask=smask[:, None], other=0.0)
        if FP32:
            logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            logits = tl.dot(q, tl.trans(k)) * scale
        if CAPPED:
            logits, _ = soft_cap(logits, softcap)
        logits = tl.where(ok[None, :] & gmask[:, None], logits, float("-inf"))
        tl.store(LOGITS + (bh * BLOCK_G + g)[:, None] * S + s[None, :], logits, mask=gmask[:, None] & smask[None, :])
        m_new = tl.maximum(m, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        p = tl.exp(logits - m_safe[:, None])
        l = l * rescale + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + s[:, None] * svs + dv[None, :], mask=smask[:, None], other=0.0)
        if FP32:
            acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    part = bh * NS + split
    tl.store(PART_M + part * BLOCK_G + g, m)
    tl.store(PART_L + part * BLOCK_G + g, l)
    tl.store(PART_ACC + (part * BLOCK_G + g)[:, None] * DV + dv[None, :], acc)


@triton.jit
def _combine_kernel(Q, N, MU_K, MU_V, COM, PART_M, PART_L, PART_ACC, OUT, FINAL_M, FINAL_L, MEAN_LOGIT, SINKS, VRANGE,
                    NS, scale, softcap, sqb, sqh, sob, soh,
                    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    NS_P2: tl.constexpr, BLOCK_DV: tl.constexpr, CORRECTED: tl.constexpr,
                    MOMENT_AWARE: tl.constexpr, HAS_SINKS: tl.constexpr, CAPPED: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    i = tl.arange(0, NS_P2)
    imask = i < NS
    rows = (bh * NS + i)[:, None] * BLOCK_G + g[None, :]
    pm = tl.load(PART_M + rows, mask=imask[:, None], other=float("-inf"))
    pl = tl.load(PART_L + rows, mask=imask[:, None], other=0.0)
    m = tl.max(pm, 0)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    count = tl.load(N + bh)
    if CORRECTED:
        mu_k = tl.load(MU_K + bh * D + d)
        mean_logit = scale * tl.sum(q * mu_k[None, :], 1)
        slope = tl.full([BLOCK_G], 1.0, tl.float32)
        if CAPPED:  # f(m) and f'(m): the first-order term goes through the cap, as in the reference
            mean_logit, slope = soft_cap(mean_logit, softcap)
        mean_logit = tl.where(count > 0, mean_logit, float("-inf"))
        if MOMENT_AWARE:
            tl.store(MEAN_LOGIT + bh * BLOCK_G + g, mean_logit)
        virtual = tl.log(tl.maximum(count, 1.0)) + mean_logit
        m = tl.maximum(m, virtual)
    if HAS_SINKS:  # a learned sink: a logit in the normaliser, no value
        sink = tl.load(SINKS + h * G + g, mask=gmask, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(pm - m_safe[None, :])
    total = tl.sum(w * pl, 0)
    if CORRECTED:
        w_virtual = tl.exp(virtual - m_safe)
        total += w_virtual
    if HAS_SINKS:
        total += tl.exp(sink - m_safe)
    total = tl.maximum(total, FLOAT32_TINY)
    tl.store(FINAL_M + bh * BLOCK_G + g, m_safe)
    tl.store(FINAL_L + bh * BLOCK_G + g, total)
    for c0 in range(0, DV, BLOCK_DV):
        c = c0 + tl.arange(0, BLOCK_DV)
        acc = tl.load(PART_ACC + rows[:, :, None] * DV + c[None, None, :], mask=imask[:, None, None], other=0.0)
        out = tl.sum(w[:, :, None] * acc, 0)
        if CORRECTED:
            mu_v = tl.load(MU_V + bh * DV + c)
            com = tl.load(COM + bh * DV * D + c[:, None] * D + d[None, :])
            cq = tl.dot(q, tl.trans(com), input_precision="ieee")
            virtual_value = mu_v[None, :] + (scale / tl.maximum(count, 1.0)) * slope[:, None] * cq
            # within the evicted values' range, as in the reference
            low = tl.load(VRANGE + bh * 2 * DV + c)
            high = tl.load(VRANGE + bh * 2 * DV + DV + c)
            virtual_value = tl.minimum(tl.maximum(virtual_value, low[None, :]), high[None, :])
            out += w_virtual[:, None] * virtual_value
        out = out / total[:, None]
        tl.store(OUT + b * sob + (h * G + g)[:, None] * soh + c[None, :], out.to(OUT.dtype.element_ty),
                 mask=gmask[:, None])


@triton.jit
def _momentum_kernel(LOGITS, FINAL_M, FINAL_L, MEAN_LOGIT, VALID, IMP, NORM, S, alpha, moment_weight,
                     sab, sah, sib, sih, HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK: tl.constexpr, MOMENT_AWARE: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    smask = s < S
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    m = tl.load(FINAL_M + bh * BLOCK_G + g)
    total = tl.load(FINAL_L + bh * BLOCK_G + g)
    logits = tl.load(LOGITS + (bh * BLOCK_G + g)[:, None] * S + s[None, :], mask=gmask[:, None] & smask[None, :],
                     other=float("-inf"))
    p = tl.exp(logits - m[:, None]) / total[:, None]
    if MOMENT_AWARE:
        # minus the first-order estimate of p from the evicted mean key, as in the reference
        mean_logit = tl.load(MEAN_LOGIT + bh * BLOCK_G + g)
        known = mean_logit > float("-inf")
        mean_logit = tl.where(known, mean_logit, 0.0)
        p_mean = tl.exp(mean_logit - m) / total
        estimate = p_mean[:, None] * (1.0 + logits - mean_logit[:, None])
        p -= moment_weight * tl.where(known[:, None] & (p > 0), estimate, 0.0)
    mean = tl.sum(tl.where(gmask[:, None], p, 0.0), 0) / G
    ok = tl.load(VALID + b * sab + h * sah + s, mask=smask, other=0) != 0
    imp = tl.load(IMP + b * sib + h * sih + s, mask=smask, other=0.0)
    norm = tl.load(NORM + b * sib + h * sih + s, mask=smask, other=0.0)
    tl.store(IMP + b * sib + h * sih + s, tl.where(ok, alpha * imp + mean, imp), mask=smask)
    tl.store(NORM + b * sib + h * sih + s, tl.where(ok, alpha * norm + 1.0, norm), mask=smask)


def decode_attention_triton(*, query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, n: Tensor, mu_k: Tensor,
                            mu_v: Tensor, comoment: Tensor, value_range: Tensor, importance: Tensor,
                            normalizer: Tensor, scale: float, alpha: float, moments: bool, moment_weight: float,
                            sink_logits: Tensor | None, softcap: float = 0.0, **_: Any) -> Tensor:
    """Same contract as the reference ``decode_attention``."""
    b, hq, d = query.shape
    hkv, slots, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    if not tiles(d, dv):
        return decode_attention_reference(
            query=query, keys=keys, values=values, valid=valid, n=n, mu_k=mu_k, mu_v=mu_v, comoment=comoment,
            value_range=value_range, importance=importance, normalizer=normalizer, scale=scale, alpha=alpha,
            moments=moments, moment_weight=moment_weight, sink_logits=sink_logits, softcap=softcap)
    g = hq // hkv
    block_g = max(16, triton.next_power_of_2(g))
    query, keys, values = query.contiguous(), keys.contiguous(), values.contiguous()
    valid = valid.contiguous().view(torch.uint8)
    n, mu_k, mu_v, comoment = (t.contiguous() for t in (n, mu_k, mu_v, comoment))
    config = launch_config(b, hkv, slots, max(d, dv), query.dtype)
    split, splits = config["split"], config["splits"]
    f32 = dict(dtype=torch.float32, device=query.device)
    logits = torch.empty(b * hkv, block_g, slots, **f32)
    part_m = torch.empty(b * hkv, splits, block_g, **f32)
    part_l = torch.empty(b * hkv, splits, block_g, **f32)
    part_acc = torch.empty(b * hkv, splits, block_g, dv, **f32)
    final_m = torch.empty(b * hkv, block_g, **f32)
    final_l = torch.empty(b * hkv, block_g, **f32)
    moment_aware = moments and moment_weight > 0
    mean_logit = torch.empty(b * hkv, block_g, **f32) if moment_aware else final_m  # final_m: never touched
    out = torch.empty(b, hq, dv, dtype=query.dtype, device=query.device)
    _split_kernel[(b * hkv, splits)](
        query, keys, values, valid, logits, part_m, part_l, part_acc, slots, split, splits, scale, softcap or 1.0,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), valid.stride(0), valid.stride(1),
        HKV=hkv, G=g, BLOCK_G=block_g, D=d, DV=dv, BLOCK=config["block"], FP32=config["fp32"], CAPPED=bool(softcap))
    _combine_kernel[(b * hkv,)](
        query, n, mu_k, mu_v, comoment, part_m, part_l, part_acc, out, final_m, final_l, mean_logit,
        sink_logits.contiguous() if sink_logits is not None else final_m,  # final_m: never read without sinks
        value_range.contiguous(), splits, scale, softcap or 1.0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        HKV=hkv, G=g, BLOCK_G=block_g, D=d, DV=dv, NS_P2=config["ns_p2"], BLOCK_DV=min(config["block_dv"], dv),
        CORRECTED=moments, MOMENT_AWARE=moment_aware, HAS_SINKS=sink_logits is not None, CAPPED=bool(softcap))
    imp = importance if importance.is_contiguous() else importance.contiguous()
    norm = normalizer if normalizer.is_contiguous() else normalizer.contiguous()
    _momentum_kernel[(b * hkv, triton.cdiv(slots, MOMENTUM_BLOCK))](
        logits, final_m, final_l, mean_logit, valid, imp, norm, slots, alpha, moment_weight,
        valid.stride(0), valid.stride(1), imp.stride(0), imp.stride(1), HKV=hkv, G=g, BLOCK_G=block_g,
        BLOCK=MOMENTUM_BLOCK, MOMENT_AWARE=moment_aware)
    if imp is not importance:
        importance.copy_(imp)
        normalizer.copy_(norm)
    return out
