"""Property-based tests (hypothesis): every op against brute force over random shapes and states."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momentkv.ops import SCORE_KINDS, eviction_score, fold_token, merge_set, prefill_scores
from op_states import run
from test_ops import batch_moments, naive_corrected, naive_prefill_scores

PROPERTY = settings(max_examples=40, deadline=None)


@st.composite
def attention_states(draw):
    b, hkv, g = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4]))
    s, d, evicted = draw(st.integers(1, 24)), draw(st.sampled_from([4, 8, 16])), draw(st.integers(0, 60))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    valid = torch.rand(b, hkv, s, generator=gen) < draw(st.floats(0.0, 1.0))
    ek, ev = torch.randn(b, hkv, evicted, d, generator=gen), torch.randn(b, hkv, evicted, d, generator=gen)
    n, mu_k, mu_v, comoment = (torch.zeros(b, hkv), torch.zeros(b, hkv, d), torch.zeros(b, hkv, d),
                               torch.zeros(b, hkv, d, d))
    merge_set(n, mu_k, mu_v, comoment, ek, ev, torch.ones(b, hkv, evicted, dtype=torch.bool))
    return dict(query=torch.randn(b, hkv * g, d, generator=gen), keys=torch.randn(b, hkv, s, d, generator=gen),
                values=torch.randn(b, hkv, s, d, generator=gen), valid=valid, n=n, mu_k=mu_k, mu_v=mu_v,
                comoment=comoment, importance=torch.rand(b, hkv, s, generator=gen),
                normalizer=torch.rand(b, hkv, s, generator=gen) + 1)


@PROPERTY
@given(attention_states(), st.booleans(), st.floats(0.0, 1.0), st.floats(0.05, 1.0))
def test_decode_attention_matches_brute_force(state, corrected, alpha, scale):
    before = {k: v.clone() for k, v in state.items()}
    out = run("decode_attention", state, scale=scale, alpha=alpha, moments=corrected)
    ref, probs = naive_corrected(before, scale, corrected)
    empty = ~before["valid"].any(-1) & ((before["n"] == 0) | (not corrected))  # nothing to attend: output 0
    ref = torch.where(empty.repeat_interleave(out.shape[1] // empty.shape[1], 1)[..., None], 0.0, ref)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    valid = before["valid"]
    torch.testing.assert_close(state["importance"], torch.where(valid, alpha * before["importance"] + probs.float(),
                                                                before["importance"]), rtol=1e-4, atol=1e-6)


@PROPERTY
@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 20), st.integers(1, 8), st.integers(0, 24),
       st.sampled_from(SCORE_KINDS), st.booleans(), st.integers(0, 2**31 - 1), st.integers(0, 12),
       st.booleans())
def test_evict_matches_brute_force(b, h, s, budget, recent, score_kind, shared, seed, decode_len, cap_window):
    gen = torch.Generator().manual_seed(seed)
    d = 4
    valid = torch.rand(b, h, s, generator=gen) < 0.8
    evictable = torch.rand(b, h, s, generator=gen) < 0.7
    if shared:  # a layer-shared cache has one layout across its heads
        valid, evictable = valid[:, :1].expand(b, h, s).contiguous(), evictable[:, :1].expand(b, h, s).contiguous()
    positions = torch.stack([torch.randperm(s, generator=gen) for _ in range(b * h)]).view(b, h, s)
    state = dict(keys=torch.randn(b, h, s, d, generator=gen), values=torch.randn(b, h, s, d, generator=gen),
                 valid=valid, evictable=evictable, importance=torch.rand(b, h, s, generator=gen),
                 normalizer=torch.rand(b, h, s, generator=gen) + 0.1, positions=positions,
                 n=torch.full((b, h), 2.0), mu_k=torch.randn(b, h, d, generator=gen),
                 mu_v=torch.randn(b, h, d, generator=gen), comoment=torch.randn(b, h, d, d, generator=gen),
                 free_slot=torch.full((b, h), -1), decode_len=torch.tensor(decode_len), seen=torch.tensor(s))
    before = {k: v.clone() for k, v in state.items()}
    run("evict", state, budget=budget, score_kind=score_kind, recent_window=recent, cap_window=cap_window,
        layer_scope=shared, seed=3, moments=True)
    score = eviction_score(score_kind, before["importance"], before["normalizer"], before["positions"],
                           before["seen"], before["decode_len"], 3)
    for bi in range(b):
        for hi in range(h):
            heads = range(h) if shared else [hi]
            evictable = [j for j in range(s) if all(before["valid"][bi, x, j] and before["evictable"][bi, x, j]
                                                    for x in heads)]
            window = recent if not cap_window else min(recent, len(evictable) - len(evictable) // 8)  # 7 in 8
            candidates = [j for j in evictable if all(before["positions"][bi, x, j] < s - window for x in heads)]
            rank = score
            if not candidates:  # the window covers every evictable token: the oldest goes
                candidates, rank = evictable, before["positions"].float()
            gone = (before["valid"][bi, hi] & ~state["valid"][bi, hi]).nonzero().flatten().tolist()
            if decode_len <= budget or not candidates:
                assert gone == [] and state["free_slot"][bi, hi] == -1 and state["n"][bi, hi] == 2.0
                continue
            values = {j: sum(rank[bi, x, j].item() for x in heads) / len(heads) for j in candidates}
            expected = min(candidates, key=lambda j: (values[j], j))
            assert gone == [expected] and state["free_slot"][bi, hi] == expected
            k, v = before["keys"][bi, hi, expected].double(), before["values"][bi, hi, expected].double()
            mu_k = before["mu_k"][bi, hi].double() + (k - before["mu_k"][bi, hi].double()) / 3
            mu_v = before["mu_v"][bi, hi].double() + (v - before["mu_v"][bi, hi].double()) / 3
            com = before["comoment"][bi, hi].double() + torch.outer(v - before["mu_v"][bi, hi].double(), k - mu_k)
            assert state["n"][bi, hi] == 3.0
            torch.testing.assert_close(state["mu_k"][bi, hi].double(), mu_k, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state["mu_v"][bi, hi].double(), mu_v, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state["comoment"][bi, hi].double(), com, rtol=1e-5, atol=1e-5)


@PROPERTY
@given(st.integers(1, 2), st.integers(1, 2), st.sampled_from([1, 3]), st.integers(1, 6), st.integers(6, 30),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_prefill_scores_match_brute_force(b, hkv, g, w, length, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    query, keys = torch.randn(b, hkv * g, w, 8, generator=gen), torch.randn(b, hkv, length, 8, generator=gen)
    key_valid = torch.ones(b, length, dtype=torch.bool)
    key_valid[:, : int(torch.randint(0, length - w + 1, (), generator=gen))] = False  # left padding
    importance, normalizer = prefill_scores(query, keys, key_valid, 0.3, alpha)
    ref_importance, ref_normalizer = naive_prefill_scores(query, keys, key_valid, 0.3, alpha)
    torch.testing.assert_close(importance.double(), ref_importance, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(normalizer.double(), ref_normalizer, rtol=1e-6, atol=1e-6)


@PROPERTY
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(0, 2**31 - 1), st.booleans())
def test_moments_of_any_fold_sequence_equal_batch_statistics(parts, seed, one_by_one):
    gen = torch.Generator().manual_seed(seed)
    total = sum(parts)
    keys, values = torch.randn(total, 5, generator=gen) * 4 + 2, torch.randn(total, 3, generator=gen) - 1
    n, mu_k, mu_v, com = torch.zeros(1, 1), torch.zeros(1, 1, 5), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3, 5)
    start = 0
    for part in parts:
        if one_by_one:
            for i in range(start, start + part):
                fold_token(n, mu_k, mu_v, com, keys[i].view(1, 1, 5), values[i].view(1, 1, 3),
                           torch.ones(1, 1, dtype=torch.bool))
        else:
            mask = torch.zeros(1, 1, total, dtype=torch.bool)
            mask[..., start:start + part] = True
            merge_set(n, mu_k, mu_v, com, keys.view(1, 1, total, 5), values.view(1, 1, total, 3), mask)
        start += part
    count, ref_k, ref_v, ref_c = batch_moments(keys, values)
    assert n.item() == count
    torch.testing.assert_close(mu_k[0, 0].double(), ref_k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mu_v[0, 0].double(), ref_v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(com[0, 0].double(), ref_c, rtol=1e-4, atol=1e-3)
