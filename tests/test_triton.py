"""Triton kernels against the reference kernels: under TRITON_INTERPRET=1 on CPU, natively on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("without CUDA these tests need TRITON_INTERPRET=1 set before torch is imported "
                       "(tests/conftest.py sets it when there is no /dev/nvidia0; set it by hand otherwise)")

triton = pytest.importorskip("triton")

from momentkv.ops.kernels import REFERENCES  # noqa: E402
from momentkv.ops.prefill import prefill_scores_reference  # noqa: E402
from momentkv.ops.scores import SCORE_KINDS  # noqa: E402
from momentkv.ops.signature import by_name  # noqa: E402
from momentkv.ops.triton_decode_attention import decode_attention_triton  # noqa: E402
from momentkv.ops.triton_evict import evict_triton  # noqa: E402
from momentkv.ops.triton_prefill_scores import prefill_scores_triton  # noqa: E402
from op_states import op_arguments  # noqa: E402

ATTENTION = {"triton": by_name(decode_attention_triton), "reference": by_name(REFERENCES["decode_attention"])}
EVICT = {"triton": by_name(evict_triton), "reference": by_name(REFERENCES["evict"])}

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def attention_state(b, hq, hkv, s, d, dtype, evicted, invalid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = dict(
        query=torch.randn(b, hq, d, generator=gen),
        keys=torch.randn(b, hkv, s, d, generator=gen),
        values=torch.randn(b, hkv, s, d, generator=gen),
        valid=torch.rand(b, hkv, s, generator=gen) >= invalid,
        n=torch.full((b, hkv), float(evicted)),
        mu_k=torch.randn(b, hkv, d, generator=gen) * 0.3 * (evicted > 0),
        mu_v=torch.randn(b, hkv, d, generator=gen) * (evicted > 0),
        comoment=torch.randn(b, hkv, d, d, generator=gen) * (evicted > 0),
        importance=torch.rand(b, hkv, s, generator=gen),
        normalizer=torch.rand(b, hkv, s, generator=gen) + 1,
    )
    for name in ("query", "keys", "values"):
        state[name] = state[name].to(dtype)
    return {k: v.to(DEVICE) for k, v in state.items()}


CASES = [  # (batch, query heads, kv heads, slots, head_dim, evicted, fraction invalid)
    pytest.param(2, 2, 2, 70, 64, 0, 0.0, id="empty-evicted-set_full-region_gqa1"),
    pytest.param(2, 8, 2, 70, 64, 5, 0.3, id="padded-rows_gqa4"),
    pytest.param(1, 8, 1, 130, 64, 9, 0.0, id="gqa8_three-blocks"),
    pytest.param(2, 4, 1, 33, 128, 3, 0.5, id="head-dim-128"),
    pytest.param(1, 2, 1, 17, 256, 2, 0.2, id="head-dim-256"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b, hq, hkv, s, d, evicted, invalid", CASES)
@pytest.mark.parametrize("corrected, moment_weight", [(True, 0.0), (True, 0.7), (False, 0.0)],
                         ids=["moments", "moment-informed", "none"])
def test_decode_attention_kernel_matches_reference(b, hq, hkv, s, d, evicted, invalid, dtype, corrected,
                                                   moment_weight):
    state = attention_state(b, hq, hkv, s, d, dtype, evicted, invalid)
    state["valid"][0, 0] = False  # a padded row: nothing to attend in one head
    expected_state = {k: v.clone() for k, v in state.items()}
    options = dict(scale=0.125, alpha=0.85, moments=corrected, moment_weight=moment_weight)
    out = ATTENTION["triton"](*op_arguments(state, **options))
    expected = ATTENTION["reference"](*op_arguments(expected_state, **options))
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(state["importance"], expected_state["importance"], rtol=tol, atol=tol)
    torch.testing.assert_close(state["normalizer"], expected_state["normalizer"])


def evict_state(b, h, s, d, budget, decode_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt = s - budget - 1
    valid = torch.ones(b, h, s, dtype=torch.bool)
    valid[0, :, : prompt // 2] = False  # left padding in row 0
    evictable = torch.zeros(b, h, s, dtype=torch.bool)
    evictable[..., prompt:] = True
    evictable[-1, :, 2:prompt] = True  # a row whose prompt competes (sinks 0, 1)
    positions = torch.randperm(s, generator=gen).expand(b, h, s).contiguous()
    state = dict(
        keys=torch.randn(b, h, s, d, generator=gen), values=torch.randn(b, h, s, d, generator=gen),
        valid=valid, evictable=evictable,
        importance=torch.rand(b, h, s, generator=gen), normalizer=torch.rand(b, h, s, generator=gen) + 0.5,
        positions=positions, n=torch.full((b, h), 3.0), mu_k=torch.randn(b, h, d, generator=gen),
        mu_v=torch.randn(b, h, d, generator=gen), comoment=torch.randn(b, h, d, d, generator=gen),
        free_slot=torch.full((b, h), -1, dtype=torch.int64), decode_len=torch.tensor(decode_len),
        seen=torch.tensor(s + 5),
    )
    return {k: v.to(DEVICE) for k, v in state.items()}


@pytest.mark.parametrize("score_kind", SCORE_KINDS, ids=["stored", "normalized", "position", "hash"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "per-layer"])
@pytest.mark.parametrize("decode_len, d, recent, cap_window",
                         [(9, 64, 2, False), (3, 64, 2, False), (9, 128, 2, False), (9, 64, 200, False),
                          (9, 64, 200, True)],
                         ids=["over-budget", "under-budget", "d128", "window-exceeds-cache", "window-capped"])
def test_evict_kernel_matches_reference(score_kind, shared, decode_len, d, recent, cap_window):
    state = evict_state(b=3, h=2, s=150, d=d, budget=8, decode_len=decode_len)
    state["value_range"] = torch.zeros(3, 2, 2, d, device=DEVICE)
    expected = {k: v.clone() for k, v in state.items()}
    options = dict(budget=8, score_kind=score_kind, recent_window=recent, cap_window=cap_window, layer_scope=shared,
                   seed=5, moments=True)
    EVICT["triton"](*op_arguments(state, **options))
    EVICT["reference"](*op_arguments(expected, **options))
    assert torch.equal(state["value_range"], expected["value_range"])
    assert (state["value_range"].abs().sum() > 0) == (decode_len > 8)
    for name in ("valid", "free_slot", "n"):
        assert torch.equal(state[name], expected[name]), name
    for name in ("mu_k", "mu_v", "comoment"):
        torch.testing.assert_close(state[name], expected[name], rtol=1e-5, atol=1e-5)
    assert (state["valid"] != evict_state(3, 2, 150, d, 8, decode_len)["valid"]).any() == (decode_len > 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("alpha, softcap", [(0.0, 0.0), (0.9, 0.0), (1.0, 0.0), (0.9, 0.5)],
                         ids=["alpha-0", "alpha-0.9", "alpha-1", "soft-capped"])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (8, 2)])
def test_prefill_scores_kernel_matches_reference(dtype, alpha, softcap, hq, hkv):
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, hq, 5, 64, generator=gen).to(dtype).to(DEVICE)
    keys = torch.randn(2, hkv, 77, 64, generator=gen).to(dtype).to(DEVICE)
    key_valid = torch.ones(2, 77, dtype=torch.bool, device=DEVICE)
    key_valid[1, :20] = False
    importance, normalizer = prefill_scores_triton(query, keys, key_valid, 0.125, alpha, softcap)
    ref_importance, ref_normalizer = prefill_scores_reference(query, keys, key_valid, 0.125, alpha, softcap)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(importance, ref_importance, rtol=tol, atol=tol)
    torch.testing.assert_close(normalizer, ref_normalizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dk, dv", [(64, 64), (16, 32), (32, 16), (16, 24), (96, 96)],
                         ids=["same", "values-wider", "values-narrower", "values-24-untiled", "head-96-untiled"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["no-sinks", "sinks"])
def test_decode_attention_kernel_with_sinks_and_value_head_sizes(dtype, dk, dv, with_sinks):
    """Learned sinks (a logit in the normaliser, no value) and value heads of another size than the keys'.
    Sizes the kernel cannot tile (24, 96) run the reference: the same numbers, never a crash."""
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, s = 2, 4, 2, 40
    state = dict(query=torch.randn(b, hq, dk, generator=gen).to(dtype), keys=torch.randn(b, hkv, s, dk, generator=gen)
                 .to(dtype), values=torch.randn(b, hkv, s, dv, generator=gen).to(dtype),
                 valid=torch.rand(b, hkv, s, generator=gen) > 0.2, n=torch.full((b, hkv), 4.0),
                 mu_k=torch.randn(b, hkv, dk, generator=gen) * 0.3, mu_v=torch.randn(b, hkv, dv, generator=gen),
                 comoment=torch.randn(b, hkv, dv, dk, generator=gen) * 0.1,
                 importance=torch.rand(b, hkv, s, generator=gen), normalizer=torch.rand(b, hkv, s, generator=gen) + 1)
    state = {k: v.to(DEVICE) for k, v in state.items()}
    sinks = (torch.randn(hq, generator=gen) * 2).to(DEVICE) if with_sinks else None
    expected_state = {k: v.clone() for k, v in state.items()}
    options = dict(scale=0.2, alpha=0.9, moments=True, sink_logits=sinks)
    out = ATTENTION["triton"](*op_arguments(state, **options))
    expected = ATTENTION["reference"](*op_arguments(expected_state, **options))
    tol = TOLERANCE[dtype]
    assert out.shape == (b, hq, dv)
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(state["importance"], expected_state["importance"], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("corrected, moment_weight", [(True, 0.0), (True, 0.7), (False, 0.0)],
                         ids=["moments", "moment-informed", "none"])
def test_decode_attention_kernel_soft_caps_like_the_reference(dtype, corrected, moment_weight):
    """Gemma 2's soft cap on the logits, the virtual key's and its first-order term's included; the cap (1.0)
    binds: these logits reach about 3."""
    state = attention_state(2, 8, 2, 70, 64, dtype, evicted=5, invalid=0.3)
    state["query"] = state["query"] * 3
    expected_state = {k: v.clone() for k, v in state.items()}
    options = dict(scale=0.125, alpha=0.85, moments=corrected, moment_weight=moment_weight, softcap=1.0)
    out = ATTENTION["triton"](*op_arguments(state, **options))
    expected = ATTENTION["reference"](*op_arguments(expected_state, **options))
    uncapped = ATTENTION["reference"](*op_arguments({k: v.clone() for k, v in state.items()},
                                                    **dict(options, softcap=0.0)))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(state["importance"], expected_state["importance"], rtol=tol, atol=tol)
    assert (expected.float() - uncapped.float()).abs().max() > 10 * tol, "the cap must bind in this test"


def test_sinks_take_their_share_of_the_softmax():
    """The reference against plain softmax attention with a sink column whose value is zero."""
    gen = torch.Generator().manual_seed(4)
    b, hq, hkv, s, d = 1, 4, 2, 9, 16
    query, keys = torch.randn(b, hq, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    values, sinks = torch.randn(b, hkv, s, d, generator=gen), torch.randn(hq, generator=gen)
    state = dict(query=query, keys=keys, values=values)  # nothing evicted, every slot valid
    out = ATTENTION["reference"](*op_arguments(state, scale=0.25, alpha=0.9, moments=True, sink_logits=sinks))
    k, v = keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)
    logits = torch.cat([torch.einsum("bhd,bhsd->bhs", query, k) * 0.25, sinks.view(1, hq, 1)], -1)
    expected = torch.einsum("bhs,bhsd->bhd", logits.softmax(-1)[..., :s], v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("key_scale", [100.0, 1000.0])
def test_decode_attention_kernel_keeps_the_correction_in_range(dtype, key_scale):
    """Keys scaled up make the first-order term huge: both kernels keep the virtual value within the
    evicted values' range, so the half-precision output stays finite, and they agree."""
    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, s, d = 2, 4, 2, 24, 16
    keys = torch.randn(b, hkv, s, d, generator=gen) * key_scale
    state = dict(query=torch.randn(b, hq, d, generator=gen) * key_scale, keys=keys,
                 values=torch.randn(b, hkv, s, d, generator=gen), valid=torch.ones(b, hkv, s, dtype=torch.bool),
                 n=torch.full((b, hkv), 5.0), mu_k=torch.randn(b, hkv, d, generator=gen) * key_scale,
                 mu_v=torch.randn(b, hkv, d, generator=gen) * 0.1,
                 comoment=torch.randn(b, hkv, d, d, generator=gen) * key_scale,
                 importance=torch.zeros(b, hkv, s), normalizer=torch.zeros(b, hkv, s))
    state = {k: (v.to(dtype) if k in ("query", "keys", "values") else v).to(DEVICE) for k, v in state.items()}
    state["value_range"] = torch.tensor([-2.0, 2.0]).view(1, 1, 2, 1).expand(b, hkv, 2, d).contiguous().to(DEVICE)
    expected_state = {k: v.clone() for k, v in state.items()}
    options = dict(scale=d ** -0.5, alpha=0.9, moments=True)
    out = ATTENTION["triton"](*op_arguments(state, **options))
    expected = ATTENTION["reference"](*op_arguments(expected_state, **options))
    assert torch.isfinite(out).all() and torch.isfinite(expected).all()
    torch.testing.assert_close(out.float(), expected.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
