"""The lm-eval RULER runner: resumable cells, the full cache once per length, the table and its checks."""

from __future__ import annotations

import pytest

from momentkv.evals import ruler


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def evaluate(method, length, compression, tasks, limit, batch, kvpress_python=None, model="smollm2"):
        calls.append((method, length, compression, tuple(tasks)))
        score = {"full": 0.8, "momentkv": 0.6}.get(method, 0.2)
        return ((t, dict(score=score, samples="same")) for t in tasks)

    monkeypatch.setattr(ruler, "evaluate", evaluate)
    return calls


def test_cells_resume_and_the_full_cache_runs_once_per_length(tmp_path, fake):
    path = tmp_path / "ruler.json"
    tasks = ["niah_single_1", "ruler_vt"]
    ruler.run(path, ["full", "momentkv"], [1024], ["x2", "x4"], tasks, 2, 1)
    assert fake == [("full", 1024, "x1", tuple(tasks)), ("momentkv", 1024, "x2", tuple(tasks)),
                    ("momentkv", 1024, "x4", tuple(tasks))]
    ruler.run(path, ["full", "momentkv", "streamingllm"], [1024], ["x4"], tasks + ["ruler_cwe"], 2, 1)
    assert fake[3:] == [("full", 1024, "x1", ("ruler_cwe",)), ("momentkv", 1024, "x4", ("ruler_cwe",)),
                        ("streamingllm", 1024, "x4", tuple(tasks + ["ruler_cwe"]))]
    with pytest.raises(ValueError, match="limit must match"):
        ruler.run(path, ["full"], [1024], ["x4"], tasks, 8, 1)
    with pytest.raises(ValueError, match="holds cells of smollm2, not gemma3-270m: give another --out"):
        ruler.run(path, ["full"], [1024], ["x4"], tasks, 2, 1, model="gemma3-270m")


def test_kvpress_presses_run_at_ratios_only_and_momentkv_at_both(tmp_path, fake):
    ruler.run(tmp_path / "r.json", ["full", "momentkv", "kvpress-snapkv"], [1024], ["x4", "r0.5"], ["ruler_vt"], 2, 1)
    assert [call[:3] for call in fake] == [("full", 1024, "x1"), ("momentkv", 1024, "x4"), ("momentkv", 1024, "r0.5"),
                                           ("kvpress-snapkv", 1024, "r0.5")]


def test_ratio_table_compares_the_default_with_the_best_press_on_the_same_samples(tmp_path):
    tasks = ["niah_single_1", "ruler_fwe"]
    per_sample = {"full": [1.0] * 32, "momentkv-carry10": [1.0] * 30 + [0.0] * 2,
                  "kvpress-snapkv": [1.0] * 16 + [0.0] * 16, "kvpress-tova": [1.0] * 24 + [0.0] * 8}
    cells = {}
    for method, scores in per_sample.items():
        for task in tasks:
            compression = "x1" if method == "full" else "r0.75"
            cells[f"{method}/4096/{compression}/{task}"] = dict(score=sum(scores) / 32, scores=scores, samples="s")
    cells["momentkv-carry10/4096/r0.5/niah_single_1"] = dict(score=1.0, scores=[1.0] * 32, samples="s")  # ruler_fwe missing
    table = ruler.markdown({"limit": 32, "cells": cells})
    assert "## 4096 tokens at kvpress's compression ratios" in table
    assert "| momentkv-carry10 (the default) | — | 0.938 [" in table  # no average while a task is missing
    assert "| full | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in table
    assert "| best press | — | kvpress-tova 0.750 |" in table
    assert "| momentkv-carry10 - best press | — | +0.188 [" in table and "] win (125% of it) |" in table
    assert "| kvpress-snapkv | 0.50 | 0.50 |" in table  # each task at ratio 0.75


def test_ratios_and_compressions_are_checked_on_the_command_line(monkeypatch):
    monkeypatch.delenv("KVPRESS_PYTHON", raising=False)
    for argv, message in [(["--ratios", "1.5"], "--ratios: each must be a number in \\(0, 1\\)"),
                          (["--ratios", "half"], "--ratios: each must be a number"),
                          (["--compressions", "0"], "--compressions: each must be an integer >= 1"),
                          (["--methods", "kvpress-snapkv", "--ratios", "0.5"], "--kvpress-python"),
                          (["--methods", "kvpress-snapkv", "--kvpress-python", "python"], "give --ratios")]:
        with pytest.raises(SystemExit, match=message):
            ruler.main(argv)


def test_compression_ratio_settings_are_refused_before_loading():
    from momentkv.evals.kvpress_lm import KVPressLM
    from momentkv.evals.lm_eval_adapter import MomentKVLM

    with pytest.raises(ValueError, match="compression_ratio must be a number in \\[0, 1\\)"):
        MomentKVLM(compression_ratio=1.0)
    with pytest.raises(ValueError, match="batch_size must be 1 with compression_ratio"):
        MomentKVLM(compression_ratio=0.5, batch_size=4)
    with pytest.raises(ValueError, match="compression_ratio and prefill_budget both set"):
        MomentKVLM(compression_ratio=0.5, prefill_budget=64)
    with pytest.raises(ValueError, match="press must be one of"):
        KVPressLM(press="h2o")
    with pytest.raises(ValueError, match="batch_size must be 1 with kvpress"):
        KVPressLM(batch_size=2, python="python")
    with pytest.raises(ValueError, match="compression_ratio must be"):
        KVPressLM(compression_ratio=-0.1)


def test_table_gives_each_score_as_a_share_of_the_full_cache(tmp_path, fake):
    data = ruler.run(tmp_path / "r.json", ["full", "momentkv", "snapkv"], [2048], ["x4"], ["niah_single_1"], 2, 1)
    table = ruler.markdown(data)
    assert "## 2048 tokens, prefill budget 512 (x4, 640 cache slots)" in table
    assert "| momentkv | 0.60 (75%) | 0.600 |" in table and "| snapkv | 0.20 (25%) | 0.200 |" in table
    assert "Warning" not in table and "ruler_qa_squad" in table  # the tasks not run are listed
    data["cells"]["snapkv/2048/x4/niah_single_1"]["samples"] = "other"
    assert "different samples for niah_single_1 at 2048" in ruler.markdown(data)


def test_unknown_method_or_task_is_refused():
    with pytest.raises(SystemExit, match="unknown 'h3o'"):
        ruler.main(["--methods", "full,h3o"])
    with pytest.raises(SystemExit, match="not an offline RULER task"):
        ruler.main(["--tasks", "ruler_qa_squad"])


def test_an_interrupted_cell_keeps_the_tasks_it_finished(tmp_path, monkeypatch):
    import json

    def evaluate(method, length, compression, tasks, limit, batch, kvpress_python=None, model="smollm2"):
        yield tasks[0], dict(score=1.0, samples="s")
        raise KeyboardInterrupt

    monkeypatch.setattr(ruler, "evaluate", evaluate)
    path = tmp_path / "ruler.json"
    with pytest.raises(KeyboardInterrupt):
        ruler.run(path, ["full"], [1024], ["x4"], ["niah_single_1", "ruler_vt"], 2, 1)
    assert set(json.loads(path.read_text())["cells"]) == {"full/1024/x1/niah_single_1"}


def test_answers_pair_each_expected_value_with_the_answer_and_whether_the_context_holds_it():
    context = "One of the special magic numbers for rain is: 3968996. One for snow is: 1239465."
    samples = [{"doc": {"outputs": ["3968996"], "input": context}, "filtered_resps": [" 1239465."]},
               {"doc": {"outputs": ["3968996"], "input": context}, "filtered_resps": [" 1111111."]},
               {"doc": {"outputs": ["3968996"], "input": context}, "filtered_resps": [" 96899."]},
               {"doc": {"outputs": ["3968996"], "input": context}, "filtered_resps": [" ."]},
               {"doc": {"outputs": ["apple", "pear"], "input": "pear apple"}, "filtered_resps": [" pear"]}]
    assert ruler.answers(samples) == [["3968996", " 1239465.", True], ["3968996", " 1111111.", False],
                                      ["3968996", " 96899.", False], ["3968996", " .", False],
                                      ["apple / pear", " pear", True]]


def test_needle_misses_split_into_values_from_the_context_and_made_up_ones(tmp_path, fake):
    data = ruler.run(tmp_path / "r.json", ["full"], [2048], ["x4"], ["niah_multikey_2", "ruler_fwe"], 4, 1)
    assert "Needle misses" not in ruler.markdown(data)  # cells without answers have no such table
    # found as RULER scores it, even when the answer says more than the value and so does not occur as a whole
    answers = [["1", " 1. The end", False], ["2", " 7.", True], ["3", " 111.", False], ["4", " 9.", False]]
    data["cells"]["full/2048/x1/niah_multikey_2"].update(score=0.25, answers=answers)
    data["cells"]["full/2048/x1/ruler_fwe"].update(answers=answers)  # word lists: not a needle task
    table = ruler.markdown(data)
    assert "| full/2048/x1/niah_multikey_2 | 1 | 1 | 2 |" in table and "ruler_fwe |" not in table.split("Needle")[1]


def test_lm_evals_ruler_module_loads_without_a_false_download_message():
    """lm-eval's RULER module prints "Downloaded punkt_tab" after a failed download offline; loaded through
    momentkv it prints nothing of the kind, and says once what is missing."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    pytest.importorskip("nltk")
    code = "from momentkv.evals.ruler import import_quietly; import_quietly(); import lm_eval.tasks.ruler.niah_utils"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Downloaded" not in done.stdout + done.stderr and "Error loading" not in done.stdout + done.stderr
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        assert "punkt_tab is not installed" in done.stderr


def test_intervals_pair_the_same_samples_and_refuse_unequal_ones():
    from momentkv.evals.intervals import bootstrap_mean, paired_difference

    assert bootstrap_mean([[0.5] * 4, [1.0] * 4]) == (0.75, 0.75, 0.75)
    mean, low, high = bootstrap_mean([[0.0, 1.0] * 16])
    assert mean == 0.5 and 0.3 < low < 0.5 < high < 0.7
    # the same scores differ by nothing, however spread: pairing removes the samples' own variance
    assert paired_difference([[0.0, 1.0] * 16], [[0.0, 1.0] * 16]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same samples"):
        paired_difference([[1.0] * 4], [[1.0] * 5])
    with pytest.raises(ValueError, match="at least one sample"):
        bootstrap_mean([[]])
