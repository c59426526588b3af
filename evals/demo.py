"""``momentkv demo``: the full cache and momentkv side by side on one prompt, SmolLM2-135M-Instruct, offline.

Both answers are sampled (temperature 0.7, top-p 0.95) from the same seed, as users generate: a small
model's greedy text falls into loops that say nothing about the cache. Then momentkv is driven along the
full cache's answer, token by token, to count how often it predicts what the full cache predicts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

import momentkv

from .fidelity import stream
from .models import chat_prompt, load_smollm2
from .provenance import versions

PROMPT = ("Write a long, detailed essay on the history of the printing press: its inventors, how it spread "
          "across Europe, and how it changed science, religion and politics.")
SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.95)
PASSES = 3  # full cache, momentkv, momentkv along the full cache's answer


class Progress(LogitsProcessor):
    """A progress bar that advances once per generated token (returns the scores unchanged)."""

    def __init__(self, total: int, label: str):
        self.bar = tqdm(total=total, desc=f"{label:<28}", unit="tok", leave=True)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(1)
        return scores


class Argmax(LogitsProcessor):
    """Records each step's most likely token (which temperature and top-p do not change)."""

    def __init__(self):
        self.tokens: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.tokens.append(scores[0].argmax())
        return scores


@dataclass
class Answer:
    tokens: torch.Tensor  # the generated tokens [T]
    argmax: torch.Tensor  # the model's most likely token at each step [T]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.shape[-1] / self.seconds


def sample(model: PreTrainedModel, inputs: dict, new_tokens: int, seed: int, label: str) -> Answer:
    """One sampled answer (``seed`` fixes it), timed, with a progress bar."""
    progress, argmax = Progress(new_tokens, label), Argmax()
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, **SAMPLING,
                         logits_processor=LogitsProcessorList([progress, argmax]))
    seconds = time.perf_counter() - start
    progress.bar.close()
    return Answer(out[0, inputs["input_ids"].shape[1]:], torch.stack(argmax.tokens), seconds)


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int | None = None) -> str:
    """Two texts in two wrapped columns."""
    width = width or min(shutil.get_terminal_size((120, 24)).columns, 160)
    column = max(20, (width - 3) // 2)
    wrap = lambda text: [line for para in text.splitlines() for line in (textwrap.wrap(para, column) or [""])]  # noqa: E731
    rows = [titles, ("-" * column, "-" * column),
            *itertools.zip_longest(wrap(left), wrap(right), fillvalue="")]
    return "\n".join(f"{a:<{column}} | {b}" for a, b in rows)


def run_demo(budget: int = 64, new_tokens: int = 512, prompt: str = PROMPT, compile: bool = False, seed: int = 0,
             load: Callable[[], tuple[PreTrainedModel, Any]] = load_smollm2) -> dict[str, Any]:
    """Generate with the full cache and with momentkv, print both answers side by side and a summary;
    returns the summary."""
    print(f"momentkv demo: SmolLM2-135M-Instruct, offline. {PASSES} passes of up to {new_tokens} tokens (full cache, "
          f"momentkv with budget {budget}, momentkv along the full cache's answer); about 2 minutes on a 2-core "
          "CPU at the defaults, an estimate follows the warm-up.", flush=True)
    model, tokenizer = load()
    inputs = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt").to(model.device)
    prompt_len = inputs["input_ids"].shape[1]
    warm = sample(model, inputs, 8, seed, "warm-up")  # one-off costs (allocation, kernels) stay out of tok/s
    print(f"estimated time: about {PASSES * new_tokens / warm.tokens_per_second / 60:.1f} min", flush=True)
    full = sample(model, inputs, new_tokens, seed, "full cache")
    with momentkv.patched(model, budget=budget, compile=compile):
        sample(model, inputs, 8, seed, "warm-up")
        budgeted = sample(model, inputs, new_tokens, seed, f"momentkv (budget {budget})")
        cache = momentkv.state_of(model).cache
        layer = cache.budgeted_layers[0]
        forced = stream(model, inputs["input_ids"], inputs["attention_mask"], full.tokens[None], mask_eos=False,
                        observers=[Progress(len(full.tokens), "momentkv along full answer")])
    agreement = (forced.predicted[0] == full.argmax).float().mean().item()
    length = min(len(full.tokens), len(budgeted.tokens))
    same = int((full.tokens[:length] == budgeted.tokens[:length]).cumprod(0).sum())
    per_token = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size() * len(cache.layers)
    kv_full = (prompt_len + len(full.tokens)) * per_token
    print()
    print(side_by_side(tokenizer.decode(full.tokens, skip_special_tokens=True),
                       tokenizer.decode(budgeted.tokens, skip_special_tokens=True),
                       ("full cache", f"momentkv, budget {budget}")))
    print()
    print(f"prompt {prompt_len} tokens; sampled (temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, "
          f"seed {seed}): full cache {len(full.tokens)} tokens, momentkv {len(budgeted.tokens)}; "
          f"identical for the first {same}")
    print(f"memory: momentkv {cache.nbytes() / 2**20:.2f} MiB fixed ({layer.num_slots} slots per layer and KV head: "
          f"prompt {layer.prompt_slots} + budget {budget} + 1); the full cache ends at {kv_full / 2**20:.2f} MiB "
          "of keys and values and keeps growing")
    print(f"speed: full cache {full.tokens_per_second:.1f} tok/s, momentkv {budgeted.tokens_per_second:.1f} tok/s")
    print(f"agreement: along the full cache's answer, momentkv's most likely next token is the full cache's at "
          f"{100 * agreement:.1f}% of {len(full.tokens)} steps")
    return {
        "versions": versions(),
        "device": f"cpu, {torch.get_num_threads()} threads" if model.device.type == "cpu" else str(model.device),
        "budget": budget,
        "compile": compile,
        "sampling": dict(SAMPLING, seed=seed),
        "prompt_tokens": prompt_len,
        "full_tokens": len(full.tokens),
        "momentkv_tokens": len(budgeted.tokens),
        "identical_prefix_tokens": same,
        "slots_per_layer_and_head": layer.num_slots,
        "budgeted_cache_bytes": cache.nbytes(),
        "full_cache_kv_bytes_at_end": kv_full,
        "full_tokens_per_second": full.tokens_per_second,
        "momentkv_tokens_per_second": budgeted.tokens_per_second,
        "teacher_forced_top1_agreement": agreement,
        "full_text": tokenizer.decode(full.tokens, skip_special_tokens=True),
        "momentkv_text": tokenizer.decode(budgeted.tokens, skip_special_tokens=True),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv demo``'s options."""
    parser.add_argument("--budget", type=int, default=64, help="decode slots per layer and KV head")
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens to generate in each pass")
    parser.add_argument("--prompt", default=None, help="the user message (default: a long-essay request)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both answers")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    parser.add_argument("--json", default=None, help="also write the summary and both answers to this file")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv demo``: returns the exit code."""
    if args.new_tokens < 1:
        parser.error("--new-tokens must be >= 1")
    summary = run_demo(budget=args.budget, new_tokens=args.new_tokens, prompt=args.prompt or PROMPT,
                       compile=args.compile, seed=args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
