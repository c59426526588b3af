"""kvpress's presses in the fidelity tables are measured on the same reference tokens as momentkv's methods.

Needs a Python with kvpress 0.5.5 (transformers < 5.3) in ``$KVPRESS_PYTHON``; ``.ci/run`` makes one.
"""

from __future__ import annotations

import os

import pytest
import torch

import momentkv
from momentkv.evals.fidelity import full_cache_reference, stream
from momentkv.evals.kvpress_fidelity import kvpress_rows
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
def test_a_budget_beyond_the_generation_is_the_full_cache(reference):
    _, folder, ids, _, tokens, logprobs = reference
    rows = kvpress_rows(KVPRESS_PYTHON, folder, "tova", NEW_TOKENS + 1, list(ids), tokens, logprobs, tokens)
    assert rows["top1_rows"] == [1.0, 1.0]
    assert max(rows["kl_rows"]) < 1e-5


def test_unknown_press_is_refused_before_running():
    with pytest.raises(ValueError, match="press: unknown 'nope'"):
        kvpress_rows(KVPRESS_PYTHON, "unused", "nope", BUDGET, [], torch.zeros(0), torch.zeros(0), torch.zeros(0))
