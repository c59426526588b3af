"""The end-to-end benchmark runs (tiny model, short lengths) and reports what it measured."""

from __future__ import annotations

import pytest

import momentkv
from conftest import build_tiny
from momentkv.evals.bench import _crossover, format_table, run_bench
from momentkv.evals.step_timer import step_curve


def test_bench_measures_every_system_it_can_and_reports_the_rest(tmp_path):
    model = build_tiny("llama", tmp_path)
    result = run_bench(model, str(tmp_path), prompt_len=40, lengths=[48], budgets=[4], batches=[1],
                       systems=["full-dynamic", "momentkv-eager", "kvpress-i1"], repeats=2, kvpress_python=None,
                       log=lambda line: None, competing=1)
    assert result["competing_processes"] == 1
    rows = {row["system"]: row for row in result["rows"]}
    assert rows["kvpress-i1"]["error"] == "no --kvpress-python given"
    full, budgeted = rows["full-dynamic"], rows["momentkv-eager"]
    assert full["tokens_per_second"] > 0 and budgeted["tokens_per_second"] > 0
    assert budgeted["kv_bytes"] < full["kv_bytes"], "64 prompt slots + 5 < 40 + 48 tokens"
    assert full["kv_bytes"] == 2 * 2 * 2 * (40 + 47) * 16 * 4  # layers x (K, V) x heads x tokens x dim x fp32
    assert not hasattr(model, "_momentkv"), "the benchmark leaves the model unpatched"
    assert "momentkv-eager" in format_table(result)
    assert budgeted["speed_vs_full-dynamic"] > 0 and [n for n, _ in budgeted["curve"]] == [47]
    assert [n for n, _ in budgeted["curve_speed_vs_full-dynamic"]] == [47]
    assert momentkv.MomentKVConfig(budget=4).prompt_slots(40) == 64


def test_step_profile_times_the_step_in_place_and_each_kernel(tmp_path):
    from momentkv.evals.step_profile import profile_step

    model = build_tiny("llama", tmp_path)
    result = profile_step(model, prompt_len=24, new_tokens=12, budget=4)
    assert result["budgeted_layers"] == 2 and result["step_ms"] > 0
    assert result["full_dynamic_step_ms"] > 0
    assert result["added_per_layer_over_full_cache_us"] == 1e3 * (result["step_ms"] - result["full_dynamic_step_ms"]) / 2
    assert set(result["per_layer_warm_us"]) == {"write", "decode_step", "attention_and_momentum", "eviction"}
    assert result["step_through_dispatcher_us"] > 0 and result["cpu_kernel"] == "reference"
    assert not hasattr(model, "_momentkv")


def test_step_curve_and_crossover():
    """The curve's points double from 64 and end at the last step; the crossover is where the ratio goes above 1
    for good, not where it first touches it."""
    curve = step_curve([0.001] * 100 + [0.002] * 200)
    assert [n for n, _ in curve] == [64, 128, 256, 300]
    assert curve[0][1] == 1.0 and curve[-1][1] == 2.0
    assert _crossover([[64, 0.9], [128, 1.1], [256, 0.95], [512, 1.2], [1024, 1.3]]) == 512
    assert _crossover([[64, 1.2], [128, 0.9]]) is None


def test_a_result_from_a_modified_tree_says_so(monkeypatch):
    """Results record the commit they ran; with tracked files changed since, the commit alone would be a claim
    the result cannot back."""
    import subprocess

    from momentkv.evals import provenance

    monkeypatch.delenv("MOMENTKV_COMMIT", raising=False)
    answers = {"rev-parse": "abc123\n", "status": " M ops/cpu.py\n"}

    def fake_git(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, stdout=answers[command[1]], stderr="")

    monkeypatch.setattr(provenance.subprocess, "run", fake_git)
    assert provenance.commit() == "abc123+modified"
    answers["status"] = ""
    assert provenance.commit() == "abc123"


def test_a_result_records_the_openmp_settings_it_ran_under(monkeypatch):
    """Beside busy processes OMP_WAIT_POLICY=PASSIVE tripled both caches' speed: a timing without it is unreadable."""
    from momentkv.evals.provenance import versions

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    found = versions()
    assert found["OMP_WAIT_POLICY"] == "PASSIVE" and "OMP_NUM_THREADS" not in found


def test_a_runs_peak_memory_is_its_own_and_counts_what_a_step_held(tmp_path):
    """A row's peak RSS (capacity, bench) is the peak while it ran: memory held and freed inside a step counts (a
    batched step's temporaries), memory an earlier row held and freed does not."""
    import torch

    from momentkv.evals.step_timer import StepTimer

    big = 256 * 2**20

    def hold_and_free():
        torch.ones(big // 4).sum()  # written, so resident

    hold_and_free()  # an earlier row's peak
    timer = StepTimer(torch.device("cpu"))
    ids = torch.zeros(1, 1, dtype=torch.long)
    timer(ids, None)
    assert timer.rss_peak < timer.rss_start + big // 2, "an earlier run's peak counted"
    hold_and_free()  # inside a step
    timer(ids, None)
    assert timer.rss_peak >= timer.rss_start + big * 3 // 4, "memory held within a step missed"


def test_capacity_runs_the_largest_batch_each_cache_fits(tmp_path):
    """Throughput at a memory cap (evals/capacity.py): one sequence's cache measured (the dynamic cache extrapolated
    to its longest), the batch the cap over it, mixed-length prompts sampled."""
    from momentkv.evals.capacity import format_table as capacity_table, mixed_prompts, plot, run_capacity

    model = build_tiny("llama", tmp_path)
    one_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x heads x dim x fp32
    cap = 3 * one_token * (40 + 24)
    result = run_capacity(model, [cap, one_token], prompt_len=40, new_tokens=24, budgets=[4],
                          systems=["full-dynamic", "full-static-compiled", "momentkv-eager"], max_batch=8,
                          log=lambda line: None)
    rows = {(row["system"], row["cap_bytes"]): row for row in result["rows"]}
    dynamic, static = rows["full-dynamic", cap], rows["full-static-compiled", cap]
    # the dynamic cache holds every token but the last generated; the static one allocates their slots
    assert (dynamic["sequence_bytes"], static["sequence_bytes"]) == (one_token * (40 + 23), one_token * (40 + 24))
    assert dynamic["batch"] == static["batch"] == 3 and dynamic["tokens_per_second"] > 0
    assert dynamic["cache_bytes"] <= cap and static["cache_bytes"] == cap
    budgeted = rows["momentkv-eager", cap]
    assert budgeted["batch"] == min(8, cap // budgeted["sequence_bytes"]) and budgeted["cache_bytes"] <= cap
    assert budgeted["batch_capped"] == (cap // budgeted["sequence_bytes"] > 8)
    assert rows["full-dynamic", one_token]["fits"] == 0 and "no sequence fits" in capacity_table(result)
    ids, mask = mixed_prompts(6, 40, 96)
    assert len(set(mask.sum(1).tolist())) > 1 and (ids[mask == 0] == 0).all() and mask[:, -1].all()
    labels = plot(result, str(tmp_path / "capacity.png"))
    assert labels == ["full-dynamic", "full-static-compiled", "momentkv-eager, budget 4"]
    assert all(f"| {label} |" in capacity_table(result) for label in labels)  # the table names them as the plot
    assert (tmp_path / "capacity.png").stat().st_size > 0
    assert not hasattr(model, "_momentkv")


def busy_children() -> set[str]:
    """This process's children that spin (``evals/competing_load.py``'s)."""
    import os

    children = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline") as cmdline:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == os.getpid() and "while True" in cmdline.read():
                    children.add(pid)
        except (OSError, IndexError):  # gone meanwhile
            pass
    return children


def test_competing_load_runs_busy_processes_only_inside():
    import pytest

    from momentkv.evals.competing_load import competing_load

    with pytest.raises(ValueError, match="competing processes"):
        with competing_load(-1):
            pass
    with competing_load(2):
        assert len(busy_children()) == 2
    assert not busy_children(), "the busy processes outlived the measurement"


def test_a_hybrid_models_cache_counts_every_layer(tmp_path):
    """At a cap, momentkv's sequence holds its budgeted layers' buffers and the sliding layers transformers keeps
    (Gemma 3: the budget governs the full-attention layer alone); the dynamic cache's size is refused where its
    sliding layers would still be growing."""
    from momentkv.evals.capacity import sequence_bytes

    model = build_tiny("gemma3", tmp_path)  # two sliding layers over 6 tokens, one full
    with momentkv.patched(model, budget=8):
        held = sequence_bytes("momentkv-eager", model, 40, 24)
        budgeted = momentkv.state_of(model).cache.nbytes()
    sliding = 2 * 2 * (1 * 2 * 6 * 16 * 4)  # layers x (keys, values) x (batch, KV heads, window, head dim, fp32)
    assert held >= budgeted + sliding
    with pytest.raises(ValueError, match="prompt_len must be at least the model's sliding window \\(6\\)"):
        sequence_bytes("full-dynamic", model, 4, 24)
