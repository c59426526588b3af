"""Fidelity on tiny random models, for the architectures of which no real checkpoint is offline: a Qwen3.5 hybrid
(gated delta-net layers between the budgeted full-attention ones) and a Gemma 2 whose attention-logit soft cap binds.

Random weights can only show that eviction and the moment correction behave as on the dense models measured
elsewhere (KL against the full cache along its greedy text falls as the budget grows; the correction lowers it),
not how a trained model of the family fares. ``python -m momentkv.evals.tiny_fidelity`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import momentkv
from momentkv.evals.architectures import VOCAB, build, tiny_config
from momentkv.evals.fidelity import full_cache_reference, teacher_forced
from momentkv.evals.provenance import versions

# Gemma 2 with a soft cap that binds: query_pre_attn_scalar=1 scales the logits up 16x (a real Gemma 2's cap of 50
# seldom binds in a random model), small weights keep the greedy text varied. tests/conftest.py builds it too.
BINDING_SOFT_CAP = dict(attn_logit_softcapping=0.5, query_pre_attn_scalar=1, final_logit_softcapping=None,
                        initializer_range=0.02)
MODELS = {"qwen3_5": ("Qwen3_5ForCausalLM", {}), "gemma2": ("Gemma2ForCausalLM", BINDING_SOFT_CAP)}
CORRECTIONS = ("moments", "none")


def load(model_type: str, folder: Path) -> transformers.PreTrainedModel:
    """The sweep's tiny ``model_type`` (``evals/architectures.py``) with this module's overrides."""
    class_name, overrides = MODELS[model_type]
    if not overrides:
        return build(model_type, class_name, folder)
    model_class = getattr(transformers, class_name)
    config = tiny_config(model_type, model_class)
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder, safe_serialization=True)
    return model_class.from_pretrained(folder, dtype=torch.float32).eval()


def measure(model_type: str, budgets: list[int], new_tokens: int, rows: int, prompt_tokens: int) -> list[dict]:
    """KL and top-1 agreement against the full cache along its greedy text, per budget and correction."""
    with tempfile.TemporaryDirectory() as folder:
        model = load(model_type, Path(folder))
    ids = torch.randint(3, VOCAB, (rows, prompt_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference, logprobs = full_cache_reference(model, ids, mask, new_tokens)
        results = []
        for budget in budgets:
            for correction in CORRECTIONS:
                with momentkv.patched(model, budget=budget, correction=correction):
                    got = teacher_forced(model, ids, mask, reference, logprobs)
                results.append(dict(model=model_type, budget=budget, correction=correction, kl=got.kl,
                                    top1=got.top1, steps=got.steps * rows))
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | budget | KL, moments | KL, none | top-1, moments | top-1, none |", "|---|---|---|---|---|---|"]
    cells = {(r["model"], r["budget"], r["correction"]): r for r in results}
    for model, budget in dict.fromkeys((r["model"], r["budget"]) for r in results):
        on, off = cells[model, budget, "moments"], cells[model, budget, "none"]
        lines.append(f"| {model} | {budget} | {on['kl']:.2e} | {off['kl']:.2e} | {on['top1']:.3f} | {off['top1']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m momentkv.evals.tiny_fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON file for the results (with provenance)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    parser.add_argument("--budgets", default="8,16,32,64", help="comma-separated decode budgets")
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy tokens per prompt")
    parser.add_argument("--rows", type=int, default=8, help="prompts (random tokens)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    budgets = [int(b) for b in args.budgets.split(",")]
    found = versions()  # before measuring: the code that runs is the code recorded
    results = [row for model in args.models.split(",")
               for row in measure(model, budgets, args.new_tokens, args.rows, args.prompt_tokens)]
    print(markdown(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m momentkv.evals.tiny_fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(json.dumps(dict(command=command, versions=found, results=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
