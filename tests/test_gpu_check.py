"""scripts/gpu-check at toy shapes on the CPU: every stage runs end to end, so nothing in the script fails
for a trivial reason during a GPU lease; and the staging itself: shares, fail-soft, files as stages end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from momentkv.evals import gpu_check


def test_cpu_smoke_runs_every_stage(tmp_path):
    env = dict(os.environ, MOMENTKV_CPU_KERNEL="reference")
    done = subprocess.run([sys.executable, "-m", "momentkv.evals.gpu_check", "--device", "cpu", "--tiny",
                           "--out", str(tmp_path), "--commit", "abc123"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == list(gpu_check.STAGES)
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["lines"]
    assert summary["header"]["commit"] == "abc123" and summary["header"]["versions"]["torch"] == torch.__version__
    records = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in gpu_check.STAGES}
    assert all(r["result"].get("passed", True) for r in records.values())
    assert records["kernels"]["result"]["rows"] and not records["kernels"]["result"]["skipped"]
    graphs = records["cuda-graphs"]["result"]
    assert set(graphs["policies"]) == set(gpu_check.GRAPH_POLICIES) and not graphs["skipped"]
    assert all(row["unique_graphs"] == 1 and row["tokens_equal_eager"] for row in graphs["policies"].values())
    blocks = records["end-to-end"]["result"]["blocks"]
    assert blocks and all("speed_vs_full_static_compiled" in row for block in blocks
                          for name, row in block["systems"].items() if name != "full-static-compiled")
    capacity = records["capacity"]["result"]["runs"]
    assert capacity and all("throughput_vs_full" in row for run in capacity for row in run["rows"]
                            if row["system"] != "full-static-compiled")
    assert all(r["finite"] for r in records["long-run"]["result"]["runs"])
    assert "gpu-check on" in done.stdout and "end-to-end" in done.stdout and "tokens, cap 0.000977 GiB" in done.stdout


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(ctx, until):
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(gpu_check.STAGES, "kernels", broken)
    ctx = gpu_check.Context(gpu_check.TINY, torch.device("cpu"), tmp_path, dict(device="cpu"))
    records = gpu_check.run(ctx, ["kernels", "environment"])
    assert [r["status"] for r in records] == ["error", "ok"]
    written = json.loads((tmp_path / "kernels.json").read_text())
    assert "no such kernel" in written["error"] and (tmp_path / "environment.json").exists()


def test_time_a_stage_leaves_goes_to_the_next(tmp_path, monkeypatch):
    def instant(ctx, until):
        return {}

    for name in ("environment", "kernels"):
        monkeypatch.setitem(gpu_check.STAGES, name, instant)
    ctx = gpu_check.Context(gpu_check.replace(gpu_check.TINY, budget_s=100.0), torch.device("cpu"), tmp_path, {})
    records = gpu_check.run(ctx, ["environment", "kernels"])
    weights = gpu_check.WEIGHTS
    assert records[0]["allotted_seconds"] == pytest.approx(100 * weights["environment"]
                                                           / (weights["environment"] + weights["kernels"]), abs=0.2)
    assert records[1]["allotted_seconds"] == pytest.approx(100, abs=0.5)  # the first stage used almost nothing


def test_the_script_runs_the_module():
    script = Path(__file__).parents[1] / "scripts" / "gpu-check"
    done = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--tiny" in done.stdout and "--quick" in done.stdout


def test_end_to_end_keeps_the_repeats_done_when_the_deadline_stops_a_run(tmp_path, monkeypatch):
    """A generation cut by the stage's deadline is dropped, the repeats every system finished are kept, and
    the blocks after it are listed as skipped, not run."""
    from momentkv.evals import bench

    calls = []

    def fake(system, model, ids, new_tokens, budget, kvpress, folder, timed=True, deadline=None):
        if not timed:
            return {}
        calls.append(system)
        steps = new_tokens - 1 if len(calls) < 4 else 3  # the fourth timed run is cut short
        return dict(decode_steps=steps, tokens_per_second=10.0 * len(calls), step_ms_median=1.0, kv_bytes=1)

    monkeypatch.setattr(bench, "run_system", fake)
    ctx = gpu_check.Context(gpu_check.TINY, torch.device("cpu"), tmp_path, {})
    result = gpu_check.end_to_end(ctx, until=float("inf"))
    assert calls == ["full-static-compiled", "momentkv-compiled", "full-static-compiled", "momentkv-compiled"]
    (block,) = result["blocks"]
    assert block["repeats"] == 1 and block["systems"]["momentkv-compiled budget 8"]["speed_vs_full_static_compiled"] == 2
    assert result["skipped"] == [dict(new_tokens=24, batch=1, stopped_by_deadline_after_repeats=1)]
