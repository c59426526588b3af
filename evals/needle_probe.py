"""Why a prefill budget loses the needle: what the prefill selection keeps, and what keeping the facts would give.

For RULER-style samples (evals/workloads.py), a method's prefill compression is measured two ways:
- per layer, the fraction of the hidden facts' tokens that each KV head keeps;
- retrieval accuracy with an oracle selection that ranks the facts' tokens first in every layer from
  ``oracle_from`` on (the other layers keep their own choice, without the model-wide vote), the rest unchanged.
If the oracle reaches the full cache's accuracy, the budget is large enough and the scoring is what misses.
Usage: python -m momentkv.evals.needle_probe --out results/eval/needle-probe.json [options]
"""

from __future__ import annotations

import argparse
import itertools
import json
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import momentkv
from momentkv.policies.momentum import momentum

from .methods import method
from .models import chat_prompt, load_smollm2
from .workloads import RETRIEVAL_TASKS, RetrievalSample, retrieval_samples, retrieval_score

ANSWER_TOKENS = 32  # as in the suite's retrieval workload
DECODE_BUDGET = 32
FACT_SCORE = 1e11  # above any attention score, below the prefill ranks of sinks and the recent window
_ORACLES = itertools.count()


def fact_tokens(tokenizer: PreTrainedTokenizerBase, text: str, sample: RetrievalSample) -> list[int]:
    """Positions of the tokens of ``text`` that overlap one of the sample's hidden facts."""
    spans = [(text.index(f), text.index(f) + len(f)) for f in sample.facts]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    return [i for i, (a, b) in enumerate(offsets) if any(a < end and b > start for start, end in spans)]


@contextmanager
def facts_first(positions: list[int], from_layer: int) -> Iterator[str]:
    """A registered rule, for the duration, whose name is yielded: momentum (``momentkv.policies.momentum``), with
    the prompt tokens at ``positions`` scored first in the budgeted layers numbered >= ``from_layer``; sinks and
    the recent window stay first. Meant for ``prefill_vote=0`` and a kept prompt: a vote would carry the oracle's
    choice into the layers below ``from_layer``."""
    facts = torch.tensor(positions)

    def oracle(score: torch.Tensor, attention: torch.Tensor, position: torch.Tensor, key: torch.Tensor,
               step: torch.Tensor, *, alpha: float, bias_correction: bool, normalizer: torch.Tensor,
               layer: int) -> torch.Tensor:
        new = momentum(score, attention, position, key, step, alpha=alpha, bias_correction=bias_correction,
                       normalizer=normalizer)
        if layer < from_layer:
            return new
        return torch.where(torch.isin(position, facts.to(position.device)), FACT_SCORE, new)

    name = f"facts-first-from-{from_layer}-{next(_ORACLES)}"
    momentkv.register_policy(name, oracle)
    try:
        yield name
    finally:
        momentkv.unregister_policy(name)


def kept_fractions(model: PreTrainedModel, ids: torch.Tensor, positions: list[int], config: momentkv.MomentKVConfig
                   ) -> list[list[float]]:
    """Per budgeted layer and KV head, the fraction of ``positions`` still in the cache after prefill."""
    with momentkv.patched(model, config=config):
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        layers = momentkv.state_of(model).cache.budgeted_layers
    wanted = torch.tensor(positions)
    rows = []
    for layer in layers:
        kept = layer.state.positions[0].masked_fill(~layer.state.valid[0], -1)
        rows.append([torch.isin(wanted, head).float().mean().item() for head in kept])
    return rows


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor,
           config: momentkv.MomentKVConfig | None) -> str:
    """The greedy answer, with the budgeted cache of ``config`` or the full cache if None."""
    with momentkv.patched(model, config=config) if config else nullcontext():
        out = model.generate(input_ids=ids, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: str, length: int, compression: int,
          samples: int, method_name: str, oracle_from: list[int], options: dict[str, Any] | None = None,
          seed: int = 0) -> dict[str, Any]:
    """``options``: MomentKVConfig fields that override the method's (to try a scoring variant);
    ``seed``: which samples (the evaluation's are seed 0; others are held apart for choosing defaults)."""
    config = method(method_name).config(DECODE_BUDGET, prefill_budget=length // compression, **(options or {}))
    own_choice = replace(config, prefill_vote=0.0)  # what the oracle overrides: each layer's own selection
    accuracy: dict[str, float] = {"full": 0.0, method_name: 0.0, **{f"oracle_from_{n}": 0.0 for n in oracle_from}}
    kept = []
    for sample in retrieval_samples(tokenizer, task, length, samples, seed):
        text = chat_prompt(tokenizer, sample.message) + sample.answer_prefix
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        facts = fact_tokens(tokenizer, text, sample)
        kept.append(kept_fractions(model, ids, facts, config))
        accuracy["full"] += retrieval_score(answer(model, tokenizer, ids, None), sample.answers)
        accuracy[method_name] += retrieval_score(answer(model, tokenizer, ids, config), sample.answers)
        for n in oracle_from:
            with facts_first(facts, n) as oracle:
                accuracy[f"oracle_from_{n}"] += retrieval_score(
                    answer(model, tokenizer, ids, replace(own_choice, policy=oracle)), sample.answers)
    per_layer = torch.tensor(kept)  # samples x layers x heads
    return dict(task=task, length=length, compression=compression, samples=samples, seed=seed, method=method_name,
                options=options or {},
                accuracy={k: v / samples for k, v in accuracy.items()},
                facts_kept_per_layer=per_layer.mean((0, 2)).tolist(),
                facts_kept_worst_head_per_layer=per_layer.amin(2).mean(0).tolist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", default="niah_single", choices=RETRIEVAL_TASKS)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--compression", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--method", default="momentkv")
    parser.add_argument("--seed", type=int, default=0, help="sample seed: 0 is the evaluation's, others held apart")
    parser.add_argument("--oracle-from", default="0,12", help="comma-separated first layers of the oracle")
    parser.add_argument("--options", type=json.loads, default={},
                        help='JSON of MomentKVConfig fields overriding the method\'s, e.g. \'{"alpha": 1.0}\'')
    args = parser.parse_args(argv)
    model, tokenizer = load_smollm2()
    result = probe(model, tokenizer, args.task, args.length, args.compression, args.samples, args.method,
                   [int(n) for n in args.oracle_from.split(",") if n], args.options, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["accuracy"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
