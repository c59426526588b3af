"""The coverage issue's two runners at tiny size: fidelity on tiny random models, and what the budget governs in a
hybrid's cache (the full-size runs are scripts: docs/results.md, "Coverage")."""

from __future__ import annotations

import json
from unittest import mock

import transformers

from momentkv.evals import hybrid_memory, tiny_fidelity
from momentkv.evals.architectures import tiny_config


def test_tiny_fidelity_writes_every_cell(tmp_path):
    out = tmp_path / "tiny.json"
    assert tiny_fidelity.main(["--models", "qwen3_5", "--budgets", "4", "--new-tokens", "12", "--rows", "2",
                               "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    cells = {(r["model"], r["budget"], r["correction"]) for r in written["results"]}
    assert cells == {("qwen3_5", 4, "moments"), ("qwen3_5", 4, "none")}
    assert all(r["steps"] == 24 and r["kl"] >= 0 for r in written["results"])
    assert written["versions"]["commit"] and written["command"].endswith(str(out))


def test_hybrid_memory_measures_the_attention_keys_and_values_per_token():
    """On the sweep's tiny Qwen3.5 (in place of the real widths): the full-attention layer's bytes per token are its
    keys and values in bf16, the gated delta-net layers hold a fixed state, and momentkv's cache does not grow."""
    real = transformers.Qwen3_5TextConfig()
    tiny = tiny_config("qwen3_5_text", transformers.Qwen3_5ForCausalLM)
    with mock.patch.object(hybrid_memory, "real_width_config", return_value=(real, tiny)):
        result = hybrid_memory.measure("qwen3_5_text", budget=8, prompt=16, contexts=[1024, 4096])
    assert result["exact"]
    full, linear = result["per_kind"]["full_attention"], result["per_kind"]["linear_attention"]
    assert full["per_token"] == 2 * tiny.num_key_value_heads * tiny.head_dim * 2
    assert linear["per_token"] == 0 and linear["fixed"] > 0
    short, long = result["rows"]
    assert short["momentkv_mib"] == long["momentkv_mib"] < short["full_mib"] < long["full_mib"]
    assert 0 < short["budgeted_share"] < long["budgeted_share"] < 1
