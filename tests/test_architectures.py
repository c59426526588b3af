"""Every causal-LM architecture of the installed transformers: exact, or refused at patch time with a reason.

The sweep itself (``momentkv.evals.architectures``) builds each tiny model; these tests run it in CI and
pin the attention variants momentkv supports for real (each fails on the code before that support).
"""

from __future__ import annotations

import inspect

import pytest
import transformers

from momentkv.evals.architectures import causal_lm_architectures, check

ARCHITECTURES = dict(causal_lm_architectures())


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_is_exact_or_refused(model_type, tmp_path):
    outcome = check(model_type, ARCHITECTURES[model_type], tmp_path)
    assert outcome.outcome not in ("wrong", "crash"), outcome.reason
    if "does not go through transformers' attention interface" in outcome.reason:  # a true reason only
        source = inspect.getsource(inspect.getmodule(getattr(transformers, ARCHITECTURES[model_type])))
        assert "ALL_ATTENTION_FUNCTIONS" not in source, f"its modeling code dispatches through the interface: {outcome}"


@pytest.mark.parametrize("model_type, variant", [
    ("gpt_oss", "learned attention sinks in the softmax normaliser (and sliding layers between)"),
    ("granite_swa", "learned attention sinks"),
    ("mimo_v2_flash", "value heads wider than key heads (24 against 16), with sinks"),
    ("smollm3", "no-RoPE layers"),
    ("llama4_text", "chunked-attention layers, kept bounded like sliding ones"),
    ("qwen3_moe", "a mixture-of-experts block"),
    ("gemma3_text", "sliding-window layers between the budgeted ones"),
    ("gemma2", "attention-logit soft-capping (binding only in tests/conftest.py's tiny Gemma 2), sliding layers"),
    ("vaultgemma", "attention-logit soft-capping"),
    # dispatching through the attention interface without transformers' class flag _supports_attention_backend:
    ("qwen3_5", "gated delta-net linear-attention layers between the budgeted ones"),
    ("qwen3_next", "linear-attention layers and a mixture of experts"),
    ("jamba", "mamba layers, whose state transformers' cache bounds"),
    ("falcon", "its own decoder, rotary, without ALiBi"),
    ("falcon_h1", "'hybrid' layers: a mamba state beside full attention in one decoder layer"),
    ("bamba", "mamba layers and an attention layer (Bamba-9B's mix; the default config has none)"),
    ("granitemoehybrid", "mamba layers and an attention layer (Granite-4.0-H's mix)"),
    ("zamba2", "'hybrid' layers beside mamba layers"),
])
def test_attention_variant_is_exact(model_type, variant, tmp_path):
    outcome = check(model_type, ARCHITECTURES[model_type], tmp_path)
    assert outcome.outcome == "exact", f"{variant}: {outcome.reason}"


@pytest.mark.parametrize("model_type, reason", [
    ("mistral", "none of its layers has full attention"),  # every layer sliding: a budget would change nothing
    ("deepseek_v3", "reads keys or values other than the cache's own"),  # a latent (MLA) cache, expanded later
    ("jetmoe", "reads keys or values other than the cache's own"),  # keys repeated per expert after the cache
    ("diffllama", "reads keys or values other than the cache's own"),  # two attention calls on split values
    ("mpt", "does not go through transformers' attention interface"),
    ("bart", "cross-attention layers"),  # BartForCausalLM: a decoder with the encoder's cross-attention
    ("inkling_text", "its attention uses position_bias (a tensor"),  # a relative position bias added to the scores
])
def test_unsupported_attention_is_refused_at_patch_time(model_type, reason, tmp_path):
    outcome = check(model_type, ARCHITECTURES[model_type], tmp_path)
    assert outcome.outcome == "refused" and reason in outcome.reason, outcome
    assert repr(model_type) in outcome.reason


def test_refusals_group_by_reason_whatever_the_model(tmp_path):
    from momentkv.evals.architectures import Outcome, write_markdown

    reason = ("momentkv cannot patch model type {!r}: a two-token trial generation with the budgeted cache failed: "
              "UnsupportedAttention: momentkv cannot budget layer {} of model type {!r}: its attention reads keys")
    outcomes = [Outcome("aa", "AaForCausalLM", "refused", reason.format("aa", 0, "aa")),
                Outcome("bb", "BbForCausalLM", "refused", reason.format("bb", 3, "bb")),
                Outcome("cc", "CcForCausalLM", "exact", "")]
    write_markdown(outcomes, tmp_path / "models.md")
    rows = [line for line in (tmp_path / "models.md").read_text().splitlines() if "| 2: aa, bb |" in line]
    assert len(rows) == 1 and "'aa'" not in rows[0] and "layer 3" not in rows[0], rows
