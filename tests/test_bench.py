"""The end-to-end benchmark runs (tiny model, short lengths) and reports what it measured."""

from __future__ import annotations

import momentkv
from conftest import build_tiny
from momentkv.evals.bench import format_table, run_bench


def test_bench_measures_every_system_it_can_and_reports_the_rest(tmp_path):
    model = build_tiny("llama", tmp_path)
    result = run_bench(model, str(tmp_path), prompt_len=40, lengths=[48], budgets=[4], batches=[1],
                       systems=["full-dynamic", "momentkv-eager", "kvpress-i1"], repeats=2, kvpress_python=None,
                       log=lambda line: None)
    rows = {row["system"]: row for row in result["rows"]}
    assert rows["kvpress-i1"]["error"] == "no --kvpress-python given"
    full, budgeted = rows["full-dynamic"], rows["momentkv-eager"]
    assert full["tokens_per_second"] > 0 and budgeted["tokens_per_second"] > 0
    assert budgeted["kv_bytes"] < full["kv_bytes"], "64 prompt slots + 5 < 40 + 48 tokens"
    assert full["kv_bytes"] == 2 * 2 * 2 * (40 + 47) * 16 * 4  # layers x (K, V) x heads x tokens x dim x fp32
    assert not hasattr(model, "_momentkv"), "the benchmark leaves the model unpatched"
    assert "momentkv-eager" in format_table(result)
    assert momentkv.MomentKVConfig(budget=4).prompt_slots(40) == 64


def test_step_profile_splits_the_measured_step(tmp_path):
    from momentkv.evals.step_profile import profile_step

    model = build_tiny("llama", tmp_path)
    result = profile_step(model, prompt_len=24, new_tokens=12, budget=4)
    split = result["split_ms"]
    assert result["budgeted_layers"] == 2 and result["step_ms"] > 0
    assert all(split[k] > 0 for k in ("attention_and_momentum", "eviction", "cache_write"))
    assert abs(sum(split.values()) - result["step_ms"]) < 1e-6
    assert result["attention_through_dispatcher_us"] > 0 and result["cpu_kernel"] == "reference"
    assert not hasattr(model, "_momentkv")
