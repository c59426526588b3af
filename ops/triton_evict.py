"""Triton kernel of ``momentkv::evict``: one program per (sequence, KV head), or per sequence
when a layer's heads share the victim. It scans the slots for the last of the keep order
(``selection.keep_rank``, first index on ties, like ``torch.argmin``): the lowest-scored slot outside
the recent window, or the oldest if none is, as two running minima; then, if over budget, it frees
that slot and folds its key and value into the moments (Welford), all without a host round trip."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eviction import evict_reference
from .scores import HASH, HASH_BITS, NORMALIZED, POSITION, SCORE_KINDS, STORED
from .selection import WINDOW_CAP
from .triton_support import tiles

BLOCK_S = 128
# The score kinds and the hash's width as the kernels see them (a jit function reads only constexpr globals).
_STORED, _NORMALIZED, _POSITION, _HASH = (tl.constexpr(kind) for kind in (STORED, NORMALIZED, POSITION, HASH))
_HASH_SCALE = tl.constexpr(float(1 << HASH_BITS))
_HASH_MASK = tl.constexpr((1 << HASH_BITS) - 1)


@triton.jit
def _hash_uniform(age, draw, head, seed):
    # scores.hash_uniform line for line (a Triton kernel cannot call torch code); tested equal through evict.
    x = age * 0x9E3779B1 + draw * 0x85EBCA77 + head.to(tl.int64) * 0x27D4EB2F + seed
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    return (x & _HASH_MASK).to(tl.float32) / _HASH_SCALE


@triton.jit
def _score(IMP, NORM, POS, VALID, EVICTABLE, base, s, smask, step, draw, threshold, head, seed,
           SCORE_KIND: tl.constexpr):
    ok = tl.load(VALID + base + s, mask=smask, other=0) != 0
    evictable = ok & (tl.load(EVICTABLE + base + s, mask=smask, other=0) != 0)
    pos = tl.load(POS + base + s, mask=smask, other=0)
    ok = evictable & (pos < threshold)
    if SCORE_KIND == _STORED:
        score = tl.load(IMP + base + s, mask=smask, other=0.0)
    elif SCORE_KIND == _NORMALIZED:
        score = tl.load(IMP + base + s, mask=smask, other=0.0)
        score = score / tl.maximum(tl.load(NORM + base + s, mask=smask, other=1.0), 1e-20)
    elif SCORE_KIND == _POSITION:
        score = pos.to(tl.float32)
    else:
        score = _hash_uniform(step - pos, draw, head, seed)
    return ok, score, evictable, pos


@triton.jit
def _running_min(values, s0, best, index):
    """Fold one block into a running (minimum, first index of it), as ``torch.argmin`` breaks ties."""
    block_best = tl.min(values, 0)
    block_index = s0 + tl.argmin(values, 0)
    better = block_best < best
    return tl.where(better, block_best, best), tl.where(better, block_index, index)


@triton.jit
def _evict_kernel(K, V, VALID, EVICTABLE, IMP, NORM, POS, N, MU_K, MU_V, COM, VRANGE, FREE, DECODE_LEN, SEEN,
                  S, budget, recent, seed,
                  H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr,
                  SCORE_KIND: tl.constexpr, SHARED: tl.constexpr, FOLD: tl.constexpr, CAP: tl.constexpr):
    pid = tl.program_id(0)
    if SHARED:
        b = pid
        h0 = 0
        heads = H
    else:
        b = pid // H
        h0 = pid % H
        heads = 1
    step = tl.load(SEEN)
    draw = tl.load(DECODE_LEN)
    window = recent
    if CAP > 0:  # at most window_cap of the evictable slots held (in every head, if shared); CAP = WINDOW_CAP
        held = 0
        for s0 in range(0, S, BLOCK):
            s = s0 + tl.arange(0, BLOCK)
            smask = s < S
            ok = smask
            for hh in range(heads):
                base = (b * H + h0 + hh) * S
                ok = ok & (tl.load(VALID + base + s, mask=smask, other=0) != 0)
                ok = ok & (tl.load(EVICTABLE + base + s, mask=smask, other=0) != 0)
            held += tl.sum(ok.to(tl.int32), 0)
        window = tl.minimum(window, held - held // CAP)
    threshold = step - window
    best = float("inf")
    victim = 0
    oldest = float("inf")  # fallback when no candidate lies outside the recent window: the oldest evictable
    oldest_victim = 0
    for s0 in range(0, S, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        smask = s < S
        candidate = smask
        fallback = smask
        total = tl.zeros([BLOCK], tl.float32)
        age = tl.zeros([BLOCK], tl.float32)
        for hh in range(heads):
            lane = b * H + h0 + hh
            ok, score, evictable, pos = _score(IMP, NORM, POS, VALID, EVICTABLE, lane * S, s, smask, step, draw,
                                               threshold, h0 + hh, seed, SCORE_KIND)
            candidate = candidate & ok
            fallback = fallback & evictable
            total += score
            age += pos.to(tl.float32)
        best, victim = _running_min(tl.where(candidate, total / heads, float("inf")), s0, best, victim)
        oldest, oldest_victim = _running_min(tl.where(fallback, age / heads, float("inf")), s0, oldest, oldest_victim)
    fits = best < float("inf")
    victim = tl.where(fits, victim, oldest_victim)
    gate = (draw > budget) & (fits | (oldest < float("inf")))
    if gate:
        for hh in range(heads):
            lane = b * H + h0 + hh
            tl.store(VALID + lane * S + victim, 0)
            tl.store(FREE + lane, victim.to(tl.int64))
            if FOLD:
                count = tl.load(N + lane) + 1.0
                d = tl.arange(0, D)
                k = tl.load(K + (lane * S + victim) * D + d).to(tl.float32)
                mu_k = tl.load(MU_K + lane * D + d)
                mu_k_new = mu_k + (k - mu_k) / count
                tl.store(MU_K + lane * D + d, mu_k_new)
                tl.store(N + lane, count)
                for c0 in range(0, DV, BLOCK_DV):
                    c = c0 + tl.arange(0, BLOCK_DV)
                    v = tl.load(V + (lane * S + victim) * DV + c).to(tl.float32)
                    mu_v = tl.load(MU_V + lane * DV + c)
                    tl.store(MU_V + lane * DV + c, mu_v + (v - mu_v) / count)
                    com = COM + lane * DV * D + c[:, None] * D + d[None, :]
                    tl.store(com, tl.load(com) + (v - mu_v)[:, None] * (k - mu_k_new)[None, :])
                    low = VRANGE + lane * 2 * DV + c
                    tl.store(low, tl.minimum(tl.load(low), v))
                    tl.store(low + DV, tl.maximum(tl.load(low + DV), v))


def evict_triton(*, keys: Tensor, values: Tensor, valid: Tensor, evictable: Tensor, importance: Tensor,
                 normalizer: Tensor, positions: Tensor, n: Tensor, mu_k: Tensor, mu_v: Tensor, comoment: Tensor,
                 value_range: Tensor, free_slot: Tensor, decode_len: Tensor, seen: Tensor, budget: int,
                 score_kind: int, recent_window: int, cap_window: bool, layer_scope: bool, seed: int,
                 moments: bool, rank: Tensor | None, **named: Any) -> None:
    """Same contract as the reference ``evict``; every tensor must be contiguous (the cache's are). A given
    ``rank`` (tensor parallelism with a layer-scope victim) runs the reference: the kernel scores its own heads."""
    if score_kind not in SCORE_KINDS:
        raise ValueError(f"score_kind must be one of {SCORE_KINDS}, got {score_kind}")
    state = dict(keys=keys, values=values, valid=valid, evictable=evictable, importance=importance,
                 normalizer=normalizer, positions=positions, n=n, mu_k=mu_k, mu_v=mu_v, comoment=comoment,
                 value_range=value_range, free_slot=free_slot, decode_len=decode_len, seen=seen)
    b, h, slots, d = keys.shape
    dv = values.shape[-1]
    if not tiles(d, dv) or rank is not None:
        return evict_reference(**state, budget=budget, score_kind=score_kind, recent_window=recent_window,
                               cap_window=cap_window, layer_scope=layer_scope, seed=seed, moments=moments,
                               rank=rank, **named)
    if not all(t.is_contiguous() for name, t in state.items() if name not in ("decode_len", "seen")):
        raise ValueError("evict_triton needs contiguous tensors (the cache allocates them so)")
    grid = (b if layer_scope else b * h,)
    _evict_kernel[grid](
        keys, values, valid.view(torch.uint8), evictable.view(torch.uint8), importance, normalizer, positions,
        n, mu_k, mu_v, comoment, value_range, free_slot, decode_len, seen, slots, budget, recent_window, seed,
        H=h, D=d, DV=dv, BLOCK=BLOCK_S, BLOCK_DV=min(dv, 32), SCORE_KIND=score_kind, SHARED=layer_scope,
        FOLD=moments, CAP=WINDOW_CAP if cap_window else 0)
