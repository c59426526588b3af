"""The reference ops against brute force: the formulas of docs/starting-design.md section 1, computed naively."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momentkv.ops import HASH, NORMALIZED, POSITION, eviction_score, merge_set, prefill_scores
from momentkv.ops.selection import prompt_score
from op_states import op_arguments, run


def make_state(b=2, hq=4, hkv=2, s=7, d=8, dv=8, evicted=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    keys = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    values = torch.randn(b, hkv, s, dv, generator=gen).to(dtype)
    valid = torch.rand(b, hkv, s, generator=gen) > 0.3
    valid[..., 0] = True
    ek = torch.randn(b, hkv, evicted, d, generator=gen)
    ev = torch.randn(b, hkv, evicted, dv, generator=gen)
    n = torch.full((b, hkv), float(evicted))
    mu_k, mu_v = ek.mean(2), ev.mean(2)
    comoment = torch.einsum("bhlv,bhlk->bhvk", ev - mu_v[:, :, None], ek - mu_k[:, :, None])
    importance = torch.rand(b, hkv, s, generator=gen)
    normalizer = torch.rand(b, hkv, s, generator=gen) + 1
    return dict(query=q, keys=keys, values=values, valid=valid, n=n, mu_k=mu_k, mu_v=mu_v, comoment=comoment,
                importance=importance, normalizer=normalizer), (ek, ev)


def capped(logit, softcap):
    """Gemma 2's soft cap, ``c tanh(x / c)``, and its slope ``1 - tanh(x / c)^2`` (no cap: x and 1)."""
    if not softcap:
        return logit, torch.ones_like(logit)
    return softcap * torch.tanh(logit / softcap), 1 - torch.tanh(logit / softcap) ** 2


def naive_corrected(st, scale, corrected, softcap=0.0):
    """Section 1 formula, one (batch, query head) at a time, in float64. With a soft cap f, the evicted set's
    sum_j exp(f(s q.k_j)) v_j is expanded to first order around mu_k: exp(f(m)) (n mu_v + f'(m) s C q)."""
    b, hq, _ = st["query"].shape
    hkv = st["keys"].shape[1]
    out = torch.zeros(b, hq, st["values"].shape[-1], dtype=torch.float64)
    probs = torch.zeros(b, hkv, st["keys"].shape[2], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            q = st["query"][bi, h].double()
            idx = st["valid"][bi, kv].nonzero().flatten()
            w = torch.exp(capped(scale * st["keys"][bi, kv, idx].double() @ q, softcap)[0])
            num = (w[:, None] * st["values"][bi, kv, idx].double()).sum(0)
            den = w.sum()
            if corrected and st["n"][bi, kv] > 0:
                count = st["n"][bi, kv].double()
                mean_logit, slope = capped(scale * st["mu_k"][bi, kv].double() @ q, softcap)
                num = num + torch.exp(mean_logit) * (
                    count * st["mu_v"][bi, kv].double() + slope * scale * st["comoment"][bi, kv].double() @ q)
                den = den + count * torch.exp(mean_logit)
            out[bi, h] = num / den
            probs[bi, kv, idx] += w / den / (hq // hkv)
    return out, probs


@pytest.mark.parametrize("softcap", [0.0, 0.8], ids=["uncapped", "soft-capped"])
@pytest.mark.parametrize("corrected", [True, False])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (8, 1)])
def test_decode_attention_matches_formula_and_updates_momentum(corrected, hq, hkv, softcap):
    st, _ = make_state(hq=hq, hkv=hkv)
    before_i, before_z = st["importance"].clone(), st["normalizer"].clone()
    scale, alpha = 0.35, 0.8
    out = run("decode_attention", st, scale=scale, alpha=alpha, moments=corrected, softcap=softcap)
    ref, probs = naive_corrected(st, scale, corrected, softcap)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    valid = st["valid"]
    expected_i = torch.where(valid, alpha * before_i + probs.float(), before_i)
    expected_z = torch.where(valid, alpha * before_z + 1, before_z)
    torch.testing.assert_close(st["importance"], expected_i, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["normalizer"], expected_z)


@pytest.mark.parametrize("softcap", [0.0, 0.8], ids=["uncapped", "soft-capped"])
@pytest.mark.parametrize("hq, hkv", [(4, 2), (8, 1)])
def test_moment_informed_momentum_counts_only_what_the_moments_miss(hq, hkv, softcap):
    """moment_weight=1: a slot gains p_j - p_mu (1 + x_j - x_mu), x the (capped) logits; nothing when its key is
    the mean."""
    st, _ = make_state(hq=hq, hkv=hkv)
    st["keys"][:, :, 1] = st["mu_k"]
    st["valid"][:, :, 1] = True
    before = st["importance"].clone()
    scale, alpha = 0.35, 0.8
    run("decode_attention", st, scale=scale, alpha=alpha, moments=True, moment_weight=1.0, softcap=softcap)
    _, probs = naive_corrected(st, scale, True, softcap)
    q = st["query"].double().view(2, hkv, hq // hkv, -1)
    mean_logit = capped(scale * torch.einsum("bhgd,bhd->bhg", q, st["mu_k"].double()), softcap)[0]
    logits = capped(scale * torch.einsum("bhgd,bhsd->bhgs", q, st["keys"].double()), softcap)[0]
    den = torch.exp(logits).masked_fill(~st["valid"][:, :, None], 0).sum(-1) + st["n"].double()[..., None] * torch.exp(mean_logit)
    estimate = (torch.exp(mean_logit) / den)[..., None] * (1 + logits - mean_logit[..., None])
    expected = probs - torch.where(st["valid"], estimate.mean(2), 0.0)
    gained = st["importance"] - torch.where(st["valid"], alpha * before, before)
    torch.testing.assert_close(gained.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gained[:, :, 1], torch.zeros_like(gained[:, :, 1]), rtol=0, atol=1e-6)
    assert (gained >= -1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_empty_evicted_set_is_softmax_attention(dtype):
    st, _ = make_state(hq=8, hkv=2, evicted=0, dtype=dtype)
    st.update(n=torch.zeros(2, 2), mu_k=torch.zeros(2, 2, 8), mu_v=torch.zeros(2, 2, 8), comoment=torch.zeros(2, 2, 8, 8))
    out = run("decode_attention", st, scale=0.3, alpha=0.9, moments=True)
    expected = F.scaled_dot_product_attention(
        st["query"].float()[:, :, None], st["keys"].float(), st["values"].float(),
        attn_mask=st["valid"][:, :, None, None, :].repeat_interleave(4, 1).squeeze(2), scale=0.3, enable_gqa=True,
    ).squeeze(2)
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("softcap", [0.0, 1.5], ids=["uncapped", "soft-capped"])
def test_correction_recovers_attention_to_evicted_tokens(softcap):
    """With evicted keys close to their mean, the first-order correction is far closer to full attention (with a
    soft cap that binds, too: the logits of this query reach about 4, capped at 1.5)."""
    gen = torch.Generator().manual_seed(1)
    b, h, d, kept, gone = 1, 2, 16, 6, 40
    q = torch.randn(b, h, d, generator=gen)
    center = torch.randn(b, h, 1, d, generator=gen)
    k_gone = center + 0.05 * torch.randn(b, h, gone, d, generator=gen)
    v_gone = torch.randn(b, h, gone, d, generator=gen) + 3.0
    k_kept, v_kept = torch.randn(b, h, kept, d, generator=gen), torch.randn(b, h, kept, d, generator=gen)
    logits = capped(0.25 * torch.einsum("bhd,bhsd->bhs", q, torch.cat([k_kept, k_gone], 2)), softcap)[0]
    full = torch.einsum("bhs,bhsd->bhd", logits.softmax(-1), torch.cat([v_kept, v_gone], 2))
    n, mu_k, mu_v, comoment = torch.zeros(b, h), torch.zeros(b, h, d), torch.zeros(b, h, d), torch.zeros(b, h, d, d)
    merge_set(n, mu_k, mu_v, comoment, k_gone, v_gone, torch.ones(b, h, gone, dtype=torch.bool))
    args = dict(query=q, keys=k_kept, values=v_kept, valid=torch.ones(b, h, kept, dtype=torch.bool), n=n, mu_k=mu_k,
                mu_v=mu_v, comoment=comoment)
    with_c = run("decode_attention", dict(args, importance=torch.zeros(b, h, kept),
                                          normalizer=torch.zeros(b, h, kept)), scale=0.25, alpha=0.9, moments=True)
    without = run("decode_attention", dict(args, importance=torch.zeros(b, h, kept),
                                           normalizer=torch.zeros(b, h, kept)), scale=0.25, alpha=0.9, moments=False)
    assert (with_c - full).norm() < 0.05 * (without - full).norm()


def batch_moments(k, v):
    k, v = k.double(), v.double()
    mu_k, mu_v = k.mean(0), v.mean(0)
    return len(k), mu_k, mu_v, (v - mu_v).T @ (k - mu_k)


def run_evictions(steps, b=1, h=2, s=6, d=4, budget=3, score_kind=NORMALIZED, recent=1, seed=0, shared=False):
    """Drive the evict op as the cache does: write a token into the free slot, score it, evict."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.zeros(b, h, s, d), torch.zeros(b, h, s, d)
    valid = torch.zeros(b, h, s, dtype=torch.bool)
    evictable = torch.zeros(b, h, s, dtype=torch.bool)
    prompt = s - budget - 1
    evictable[..., prompt:] = True
    valid[..., :prompt] = True
    importance, normalizer = torch.zeros(b, h, s), torch.zeros(b, h, s)
    positions = torch.zeros(b, h, s, dtype=torch.int64)
    positions[..., :prompt] = torch.arange(prompt)
    n, mu_k, mu_v, com = torch.zeros(b, h), torch.zeros(b, h, d), torch.zeros(b, h, d), torch.zeros(b, h, d, d)
    free, decode_len, seen = torch.zeros(b, h, dtype=torch.int64), torch.zeros((), dtype=torch.int64), torch.tensor(prompt)
    gone_k, gone_v, victims = [[[] for _ in range(h)] for _ in range(b)], [[[] for _ in range(h)] for _ in range(b)], []
    for _ in range(steps):
        target = torch.where(decode_len <= budget, prompt + decode_len, free)
        kt = torch.randn(b, h, d, generator=gen) * 3 + 1
        vt = torch.randn(b, h, d, generator=gen) - 2
        for bi in range(b):
            for hi in range(h):
                t = target[bi, hi]
                keys[bi, hi, t], values[bi, hi, t], valid[bi, hi, t] = kt[bi, hi], vt[bi, hi], True
                positions[bi, hi, t] = seen
                importance[bi, hi, t] = torch.rand((), generator=gen)
                normalizer[bi, hi, t] = 1.0
        seen += 1
        decode_len += 1
        snapshot_valid = valid.clone()
        expected = eviction_score(score_kind, importance, normalizer, positions, seen, decode_len, 0)
        state = dict(keys=keys, values=values, valid=valid, evictable=evictable, importance=importance,
                     normalizer=normalizer, positions=positions, n=n, mu_k=mu_k, mu_v=mu_v, comoment=com,
                     free_slot=free, decode_len=decode_len, seen=seen)
        run("evict", state, budget=budget, score_kind=score_kind, recent_window=recent, layer_scope=shared, seed=0)
        gone = snapshot_valid & ~valid
        victims.append((snapshot_valid, expected, gone, positions.clone(), seen.clone()))
        for bi, hi, si in gone.nonzero().tolist():
            gone_k[bi][hi].append(keys[bi, hi, si].clone())
            gone_v[bi][hi].append(values[bi, hi, si].clone())
    return dict(n=n, mu_k=mu_k, mu_v=mu_v, comoment=com, valid=valid, gone_k=gone_k, gone_v=gone_v,
                victims=victims, budget=budget, prompt=prompt, recent=recent)


@pytest.mark.parametrize("steps", [10, 3000])
def test_folded_moments_equal_batch_statistics(steps):
    evictions = run_evictions(steps)
    for hi in range(2):
        count, mu_k, mu_v, com = batch_moments(torch.stack(evictions["gone_k"][0][hi]),
                                               torch.stack(evictions["gone_v"][0][hi]))
        assert evictions["n"][0, hi].item() == count == steps - evictions["budget"]
        torch.testing.assert_close(evictions["mu_k"][0, hi].double(), mu_k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(evictions["mu_v"][0, hi].double(), mu_v, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(evictions["comoment"][0, hi].double(), com, rtol=1e-4,
                                   atol=1e-2 * math.sqrt(steps))


@pytest.mark.parametrize("score_kind", [NORMALIZED, POSITION, HASH])
@pytest.mark.parametrize("shared", [False, True])
def test_evict_keeps_budget_and_takes_lowest_candidate(score_kind, shared):
    evictions = run_evictions(40, b=2, score_kind=score_kind, recent=2, shared=shared)
    prompt, budget = evictions["prompt"], evictions["budget"]
    for step, (valid, score, gone, positions, seen) in enumerate(evictions["victims"]):
        decode_tokens = valid[..., prompt:].sum(-1)
        if step < budget:
            assert not gone.any() and (decode_tokens == step + 1).all()
            continue
        assert (gone.sum(-1) == 1).all() and (decode_tokens - gone[..., prompt:].sum(-1) == budget).all()
        assert not gone[..., :prompt].any(), "protected prompt slots must never be evicted"
        candidates = valid & (positions < seen - evictions["recent"])
        candidates[..., :prompt] = False
        if shared:
            assert (gone == gone[:, :1]).all()
            score = score.mean(1, keepdim=True).expand_as(score)
        lowest = score.masked_fill(~candidates, float("inf")).amin(-1)
        assert torch.equal(score[gone].view(lowest.shape), lowest)


def naive_prefill_scores(q, keys, key_valid, scale, alpha, softcap=0.0):
    b, hq, w, _ = q.shape
    hkv, length = keys.shape[1], keys.shape[2]
    g = hq // hkv
    imp = torch.zeros(b, hkv, length, dtype=torch.float64)
    norm = torch.zeros(b, hkv, length, dtype=torch.float64)
    for bi in range(b):
        for t in range(w):
            pos = length - w + t
            seen = [j for j in range(pos + 1) if key_valid[bi, j]]
            decay = alpha ** (w - 1 - t)
            for h in range(hq):
                kv = h // g
                p = torch.softmax(capped(scale * keys[bi, kv, seen].double() @ q[bi, h, t].double(), softcap)[0], 0)
                imp[bi, kv, seen] += decay * p / g
            norm[bi, :, seen] += decay
    return imp, norm


@pytest.mark.parametrize("alpha, softcap", [(0.0, 0.0), (0.7, 0.0), (1.0, 0.0), (0.7, 0.5)])
def test_prefill_scores_match_brute_force(alpha, softcap):
    gen = torch.Generator().manual_seed(3)
    q, keys = torch.randn(2, 4, 3, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    key_valid = torch.ones(2, 9, dtype=torch.bool)
    key_valid[1, :4] = False
    imp, norm = prefill_scores(q, keys, key_valid, 0.4, alpha, softcap)
    ref_imp, ref_norm = naive_prefill_scores(q, keys, key_valid, 0.4, alpha, softcap)
    torch.testing.assert_close(imp.double(), ref_imp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.double(), ref_norm)


def test_merge_set_equals_batch_statistics_after_merges():
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 1, 50, 4, generator=gen) + 2, torch.randn(1, 1, 50, 3, generator=gen)
    n, mu_k, mu_v, com = torch.zeros(1, 1), torch.zeros(1, 1, 4), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3, 4)
    for part in (slice(0, 20), slice(20, 21), slice(21, 50)):
        mask = torch.zeros(1, 1, 50, dtype=torch.bool)
        mask[..., part] = True
        merge_set(n, mu_k, mu_v, com, k, v, mask)
    count, ref_k, ref_v, ref_c = batch_moments(k[0, 0], v[0, 0])
    assert n.item() == count
    torch.testing.assert_close(mu_k[0, 0].double(), ref_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu_v[0, 0].double(), ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(com[0, 0].double(), ref_c, rtol=1e-4, atol=1e-4)


def test_opcheck_every_op():
    st, _ = make_state()
    b, h, s, d = 2, 2, 7, 8
    token = dict(key=torch.randn(b, h, 1, d), value=torch.randn(b, h, 1, d))
    state = dict(st, positions=torch.arange(s).expand(b, h, s).contiguous(), decode_len=torch.tensor(5),
                 seen=torch.tensor(7))
    for options in (dict(), dict(moment_weight=0.5), dict(recent_window=6, cap_window=True), dict(layer_scope=True),
                    dict(softcap=2.0)):
        for op in ("write", "decode_attention", "evict", "decode_step"):
            copy = {k: v.clone() for k, v in state.items()}
            torch.library.opcheck(getattr(torch.ops.momentkv, op).default,
                                  op_arguments(copy, **token, scale=0.3, **options))
    torch.library.opcheck(torch.ops.momentkv.prefill_scores.default,
                          (torch.randn(2, 4, 3, d), st["keys"], torch.ones(2, s, dtype=torch.bool), 0.3, 0.9, 2.0))


@pytest.mark.parametrize("carry", [0, 2, 5])
def test_prompt_score_carries_nothing_into_or_out_of_padding(carry):
    """With ``prefill_carry`` a prompt token takes the best score of the ``carry`` tokens before it (checked by
    brute force): never a padding token's (left padding scores at random under the random policy) and never
    onto padding (right)."""
    valid = torch.tensor([[False, False, False, True, True, True, True, True],
                          [True, True, True, True, True, False, False, False]])
    zeros = torch.zeros(2, 2, 8)
    score = prompt_score(HASH, zeros, zeros, valid, seed=3, carry=carry)
    raw = prompt_score(HASH, zeros, zeros, valid, seed=3)  # padding 0, the rest in (0, 1)
    expected = torch.stack([raw[..., max(0, t - carry):t + 1].amax(-1) for t in range(8)], -1)
    assert (score[~valid[:, None, :].expand_as(score)] == 0).all()
    assert torch.equal(score, expected.masked_fill(~valid[:, None, :], 0.0))
