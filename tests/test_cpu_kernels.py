"""The fused CPU kernels (the reference bodies compiled by inductor) agree with the reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from momentkv.ops import cpu, kernels
from test_ops import make_state


def evict_args(state, seen=20, recent=1):
    b, h, s = state["valid"].shape
    return (state["keys"], state["values"], state["valid"], torch.ones(b, h, s, dtype=torch.bool),
            state["importance"], state["normalizer"], torch.arange(s).expand(b, h, s).contiguous(), state["n"],
            state["mu_k"], state["mu_v"], state["comoment"], torch.zeros(b, h, dtype=torch.int64),
            torch.tensor(5), torch.tensor(seen), 3, 0, True, recent, 0, False, 0, True)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to the eager body would compare it with itself
def test_fused_cpu_kernels_match_reference(monkeypatch):
    monkeypatch.setenv("MOMENTKV_CPU_KERNEL", "fused")
    fused = {name: cpu._fused(kernels.REFERENCES[name]) for name in ("decode_attention", "evict")}
    st, _ = make_state(hq=4, hkv=2, s=9)
    ref_state = {k: v.clone() for k, v in st.items()}
    out = fused["decode_attention"](*st.values(), 0.3, 0.9, True)
    expected = kernels.REFERENCES["decode_attention"](*ref_state.values(), 0.3, 0.9, True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st["importance"], ref_state["importance"], rtol=1e-5, atol=1e-6)

    fused["evict"](*evict_args(st))
    kernels.REFERENCES["evict"](*evict_args(ref_state))
    for name in ("valid", "n", "mu_k", "mu_v", "comoment"):
        torch.testing.assert_close(st[name], ref_state[name], rtol=1e-5, atol=1e-5)
    assert not torch.equal(st["valid"], make_state(hq=4, hkv=2, s=9)[0]["valid"]), "a slot was evicted"


def test_unknown_kernel_choice_is_refused(monkeypatch):
    monkeypatch.setenv("MOMENTKV_CPU_KERNEL", "triton")
    with pytest.raises(ValueError, match="MOMENTKV_CPU_KERNEL"):
        cpu.register_fused_cpu_kernels()


def test_fused_kernel_serves_many_settings_in_one_process():
    """An eval sweep runs many settings in one process: each gets its own compiled copy, so none
    hits dynamo's recompile cap and falls back to the eager body (with a warning)."""
    fused = cpu._fused(kernels.REFERENCES["evict"])
    limit = torch._dynamo.config.recompile_limit
    for recent in range(limit + 1):
        st, _ = make_state(hq=2, hkv=1, s=6)
        expected = {k: v.clone() for k, v in st.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            fused(*evict_args(st, seen=6, recent=recent))
        kernels.REFERENCES["evict"](*evict_args(expected, seen=6, recent=recent))
        assert torch.equal(st["valid"], expected["valid"]), recent
