"""What the budget governs in a hybrid model's cache, on real shapes: the full-attention layers' keys and values grow
with the context, the linear-attention and mamba states do not.

Each family is built from its default config in transformers (its flagship's widths) with fewer layers (the first
of each kind, as the architecture sweep shrinks them) and the sweep's small sizes for what shapes no cache
(vocabulary, feed-forward and expert widths, expert counts), at random, on CPU. On it:

1. exactness at real widths: patched greedy output with nothing evicted equals the unpatched model's (fp32, the
   sweep's left-padded batch of two);
2. memory, measured from the caches in bf16: transformers' dynamic cache after prompts of two lengths gives each
   layer's bytes per token and fixed bytes; momentkv's cache (prompt slots, budget and moments) its bytes per
   layer. Each is scaled to the real depth by counting the real config's layer kinds (layers of a kind have the
   same widths), for one sequence at each context length.

``python -m momentkv.evals.hybrid_memory`` writes the table (docs/results.md, "Hybrid models: what the budget governs").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import momentkv
from momentkv.evals.architectures import (BOS, EOS, PAD, SIZES, VOCAB, generate, prompts, shrink_layers,
                                          shrink_periods)
from momentkv.evals.provenance import versions
from momentkv.patches.support import BUDGETED, layer_types

FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "jamba", "falcon_h1", "zamba2", "olmo_hybrid")
# Sizes that shape no cache: the sweep's small ones, so that a real-width model of a few layers fits a CPU.
CACHE_FREE = ("vocab_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
              "moe_shared_expert_intermediate_size", "intermediate_size_mlp", "num_experts", "num_local_experts",
              "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "num_nextn_predict_layers")
MiB = 2**20


def real_width_config(model_type: str):
    """(the real config, the built one): the family's defaults, and them with fewer layers and CACHE_FREE shrunk."""
    config_class = type(AutoConfig.for_model(model_type))
    real = config_class()
    defaults = real.to_dict()
    kwargs = {name: SIZES[name] for name in CACHE_FREE if name in defaults}
    kwargs.update(shrink_layers(defaults, "num_hidden_layers"), **shrink_periods(defaults), pad_token_id=PAD,
                  bos_token_id=BOS, eos_token_id=EOS)
    return real, config_class(**{**defaults, **kwargs})


def tensor_bytes(layer) -> int:
    """Bytes of every tensor a cache layer holds (its attributes, their dicts and lists, a momentkv layer's state),
    each storage counted once."""
    seen: dict[int, int] = {}

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for each in value.values():
                walk(each)
        elif isinstance(value, (list, tuple)):
            for each in value:
                walk(each)
        elif is_dataclass(value) and not isinstance(value, type):
            for field in fields(value):
                walk(getattr(value, field.name))

    for value in vars(layer).values():
        walk(value)
    return sum(seen.values())


def full_cache_bytes(model, lengths: tuple[int, int]) -> list[tuple[float, float]]:
    """Per layer of transformers' dynamic cache: (bytes per token, fixed bytes), from prompts of two lengths."""
    measured = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.2x
        measured.append([tensor_bytes(layer) for layer in cache.layers])
    short, span = lengths[0], lengths[1] - lengths[0]
    return [((b - a) / span, a - (b - a) / span * short) for a, b in zip(*measured)]


def momentkv_bytes(model, budget: int, prompt: int) -> list[int]:
    """Per layer of momentkv's cache for a prompt of ``prompt`` tokens: what it holds however long the context."""
    ids = torch.randint(3, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(0))
    with momentkv.patched(model, budget=budget), torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=PAD)
        return [tensor_bytes(layer) for layer in momentkv.state_of(model).cache.layers]


def measure(model_type: str, budget: int, prompt: int, contexts: list[int]) -> dict:
    real, config = real_width_config(model_type)
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model_class(config).save_pretrained(folder, safe_serialization=True)
        model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = prompts()
    with torch.no_grad():
        expected = generate(model, ids, mask).sequences
        with momentkv.patched(model, budget=64):
            exact = torch.equal(generate(model, ids, mask).sequences, expected)
    model = model.to(torch.bfloat16)
    built_kinds, real_kinds = layer_types(config)[0], Counter(layer_types(real)[0])
    full = full_cache_bytes(model, (64, 128))
    ours = momentkv_bytes(model, budget, prompt)
    per_kind: dict[str, dict] = {}
    for kind, (per_token, fixed), held in zip(built_kinds, full, ours):
        per_kind.setdefault(kind, dict(per_token=per_token, fixed=fixed, momentkv=held))
    rows = []
    for context in contexts:
        grows = sum(real_kinds[k] * v["per_token"] * context for k, v in per_kind.items() if k in BUDGETED)
        total = sum(real_kinds[k] * (v["per_token"] * context + v["fixed"]) for k, v in per_kind.items())
        held = sum(real_kinds[k] * v["momentkv"] for k, v in per_kind.items())
        rows.append(dict(context=context, full_mib=total / MiB, budgeted_share=grows / total,
                         momentkv_mib=held / MiB))
    return dict(model=model_type, exact=exact, layers=dict(real_kinds), hidden_size=real.hidden_size,
                per_kind=per_kind, rows=rows)


def markdown(results: list[dict], budget: int, prompt: int) -> str:
    contexts = [row["context"] for row in results[0]["rows"]]
    head = " | ".join(f"{c:,} tokens: full cache (budgeted share) / momentkv" for c in contexts)
    lines = [f"| model | layers | exact at real widths | {head} |", "|---|---|---|" + "---|" * len(contexts)]
    for result in results:
        layers = ", ".join(f"{n} {kind}" for kind, n in sorted(result["layers"].items()))
        cells = " | ".join(f"{r['full_mib']:,.0f} MiB ({r['budgeted_share']:.0%}) / {r['momentkv_mib']:,.0f} MiB"
                           for r in result["rows"])
        lines.append(f"| {result['model']} | {layers} | {'yes' if result['exact'] else 'NO'} | {cells} |")
    lines.append(f"\nOne sequence, bf16; momentkv at budget {budget} with a {prompt}-token prompt (the prompt kept "
                 "in its slots, moments included), the same whatever the context.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m momentkv.evals.hybrid_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON file for the results (with the command and versions)")
    parser.add_argument("--models", default=",".join(FAMILIES), help="comma-separated model types")
    parser.add_argument("--budget", type=int, default=256, help="momentkv's decode budget")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens held in momentkv's prompt slots")
    parser.add_argument("--contexts", default="8192,32768", help="context lengths, comma-separated")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(m for m in models if m not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if unknown:
        parser.error(f"--models: not a causal-LM model type: {', '.join(unknown)}")
    found = versions()  # before measuring: the code that runs is the code recorded
    contexts = [int(c) for c in args.contexts.split(",")]
    results = [measure(model, args.budget, args.prompt, contexts) for model in models]
    print(markdown(results, args.budget, args.prompt))
    if args.out:
        command = "python -m momentkv.evals.hybrid_memory " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(command=command, versions=found, results=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
