"""``momentkv demo``: what momentkv is for, on SmolLM2-135M-Instruct, offline, in a few minutes on a laptop CPU.

A document of about 4,000 tokens hides a number, and a question asks for it. The full cache and momentkv (the
prompt compressed 4x at prefill, 64 decode slots) answer greedily, as one asks a small model for a fact (a
repetition penalty would count against the digits the answer must copy from the prompt); then each writes on to
``new_tokens``, while the demo follows the memory of each cache and the speed of each step. The passes run full
cache, momentkv, momentkv, full cache, and each speed is the mean of its two passes: load on the machine that
changes during the run weighs on both sides alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

import momentkv

from momentkv.patching import GENERATE_CACHE_ARG

from .models import chat_prompt, load_smollm2
from .provenance import versions
from .step_timer import kv_bytes
from .workloads import retrieval_samples, retrieval_score

GENERATION = dict(do_sample=False)
ORDER = ("full cache", "momentkv", "momentkv", "full cache")  # interleaved: drifting load weighs on both alike
ANSWER_TOKENS = 16  # the answer is read from the first tokens; the rest of each pass measures memory and speed
COLUMNS = 4  # the table's columns: the generation cut in this many equal windows
TASK = "niah_single"  # one number hidden in the document (evals/workloads.py)
WARM_TOKENS = 8


class Clock(LogitsProcessor):
    """The time each token's logits are ready, with a progress bar (returns the scores unchanged)."""

    def __init__(self, total: int, label: str):
        self.times: list[float] = []
        self.bar = tqdm(total=total, desc=f"{label:<24}", unit="tok", leave=True)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        self.bar.update(1)
        return scores


@dataclass
class Pass:
    tokens: torch.Tensor  # the generated tokens [T]
    prefill_seconds: float  # from the call to the first token's logits
    step_ends: list[float]  # seconds from the call to each token's logits
    cache_bytes: int  # what the cache holds at the end
    cache_tokens: int  # the tokens it has seen (the prompt and every generated token but the last)

    def step_seconds(self) -> float:
        """The median decode step (robust to a one-off slow step)."""
        return statistics.median(b - a for a, b in zip(self.step_ends, self.step_ends[1:]))

    def tokens_per_second(self, start: int, end: int) -> float:
        """Decode speed over tokens ``start`` to ``end`` (each a step after the first token's)."""
        return (end - start) / (self.step_ends[end - 1] - self.step_ends[start - 1])


def generate(model: PreTrainedModel, inputs: dict, new_tokens: int, label: str) -> Pass:
    """Exactly ``new_tokens`` tokens (the end-of-text token is held off: the pass measures a fixed length)."""
    clock = Clock(new_tokens, label)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GENERATION,
                         logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True)
    clock.bar.close()
    ends = [t - start for t in clock.times]
    state = momentkv.state_of(model)
    cache = getattr(out, GENERATE_CACHE_ARG)
    held = state.cache.nbytes() if state is not None else kv_bytes(cache)  # momentkv's: scores and moments too
    return Pass(out.sequences[0, inputs["input_ids"].shape[1]:], ends[0], ends, held, cache.get_seq_length())


def run_demo(budget: int = 64, context: int = 4096, compression: int = 4, new_tokens: int = 192,
             compile: bool = False, seed: int = 0,
             load: Callable[[], tuple[PreTrainedModel, Any]] = load_smollm2) -> dict[str, Any]:
    """Answer one long-document question with the full cache and with momentkv, then write on; print the answers
    and a table of memory and speed; returns the summary."""
    print(f"momentkv demo: SmolLM2-135M-Instruct, offline, {torch.get_num_threads()} threads. A document of about "
          f"{context} tokens and a question; the full cache against momentkv (prompt compressed {compression}x, "
          f"{budget} decode slots), {len(ORDER)} passes of {new_tokens} tokens; an estimate of the time follows the "
          "warm-up.", flush=True)
    model, tokenizer = load()
    sample = retrieval_samples(tokenizer, TASK, context, 1, seed)[0]
    inputs = tokenizer(chat_prompt(tokenizer, sample.message) + sample.answer_prefix, return_tensors="pt",
                       add_special_tokens=False).to(model.device)
    prompt_len = inputs["input_ids"].shape[1]
    settings = dict(budget=budget, prefill_budget=max(1, prompt_len // compression), compile=compile)

    def run(label: str, tokens: int) -> Pass:
        if label == "full cache":
            return generate(model, inputs, tokens, label)
        with momentkv.patched(model, **settings):
            return generate(model, inputs, tokens, label)

    warm = {label: run(label, WARM_TOKENS) for label in ORDER[:2]}  # one-off costs (allocation, kernels) stay out
    started = time.perf_counter()
    estimate = sum(warm[label].prefill_seconds + (new_tokens - 1) * warm[label].step_seconds() for label in ORDER)
    print(f"estimated time: about {estimate / 60:.1f} min", flush=True)
    passes: dict[str, list[Pass]] = {label: [] for label in ORDER[:2]}
    for label in ORDER:
        passes[label].append(run(label, new_tokens))

    full, budgeted = passes["full cache"][0], passes["momentkv"][0]
    answers = {label: tokenizer.decode(runs[0].tokens[:ANSWER_TOKENS], skip_special_tokens=True).split("\n")[0].strip()
               for label, runs in passes.items()}
    correct = {label: retrieval_score(answer, sample.answers) == 1.0 for label, answer in answers.items()}
    same = int((full.tokens == budgeted.tokens).cumprod(0).sum())
    per_token = full.cache_bytes / full.cache_tokens  # the full cache grows by this for each token it sees
    ends = sorted({max(2, round(new_tokens * k / COLUMNS)) for k in range(1, COLUMNS + 1)})
    starts = [1, *ends[:-1]]
    rows = [{"generated": end,
             "full_cache_kv_mib": (prompt_len + end - 1) * per_token / 2**20,
             "momentkv_cache_mib": budgeted.cache_bytes / 2**20,
             **{f"{key}_tokens_per_second": statistics.mean(p.tokens_per_second(start, end) for p in passes[label])
                for key, label in (("full_cache", "full cache"), ("momentkv", "momentkv"))}}
            for start, end in zip(starts, ends)]

    print()
    print(f"question: {sample.message.splitlines()[-1]}")
    for label in passes:
        print(f"  {label + ':':<12} ...{answers[label]}  [{'right' if correct[label] else 'wrong'}: {sample.answers[0]}]")
    print(f"the two {new_tokens}-token continuations are identical for the first {same} tokens; each repeated pass "
          f"gave the same tokens: {all(torch.equal(runs[0].tokens, runs[1].tokens) for runs in passes.values())}")
    print()
    print(f"| generated tokens | {' | '.join(str(row['generated']) for row in rows)} |")
    print(f"|---|{'---|' * len(rows)}")
    for name, key, fmt in (("full cache: KV MiB (grows)", "full_cache_kv_mib", ".1f"),
                           ("momentkv: cache MiB (fixed)", "momentkv_cache_mib", ".1f"),
                           ("full cache: tokens/s", "full_cache_tokens_per_second", ".1f"),
                           ("momentkv: tokens/s", "momentkv_tokens_per_second", ".1f")):
        print(f"| {name} | {' | '.join(format(row[key], fmt) for row in rows)} |")
    print(f"\nprompt {prompt_len} tokens, momentkv keeps {settings['prefill_budget']} of them (prefill_budget) and "
          f"{budget} decode slots. Tokens/s: each column's window of steps, the mean of the two passes of each, run "
          f"{', '.join(ORDER)}. Prefill: full cache {full.prefill_seconds:.1f} s, momentkv "
          f"{budgeted.prefill_seconds:.1f} s. The passes took {(time.perf_counter() - started) / 60:.1f} min (estimated "
          f"{estimate / 60:.1f}).")
    return {
        "versions": versions(),
        "device": f"cpu, {torch.get_num_threads()} threads" if model.device.type == "cpu" else str(model.device),
        "settings": dict(settings, context=context, compression=compression, new_tokens=new_tokens, seed=seed,
                         generation=GENERATION, order=ORDER, task=TASK),
        "prompt_tokens": prompt_len,
        "question": sample.message.splitlines()[-1],
        "expected": sample.answers[0],
        "answers": answers,
        "correct": correct,
        "identical_prefix_tokens": same,
        "budgeted_cache_bytes": budgeted.cache_bytes,
        "full_cache_kv_bytes_at_end": full.cache_bytes,
        "prefill_seconds": {label: [p.prefill_seconds for p in runs] for label, runs in passes.items()},
        "rows": rows,
        "texts": {label: tokenizer.decode(runs[0].tokens, skip_special_tokens=True) for label, runs in passes.items()},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv demo``'s options."""
    parser.add_argument("--budget", type=int, default=64, help="decode slots per layer and KV head")
    parser.add_argument("--context", type=int, default=4096, help="document tokens, at least 256")
    parser.add_argument("--compression", type=int, default=4, help="prompt compression at prefill: keep 1/this")
    parser.add_argument("--new-tokens", type=int, default=192, help="tokens each pass generates, at least 4")
    parser.add_argument("--seed", type=int, default=0, help="which document and question")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    parser.add_argument("--json", default=None, help="also write the summary and the texts to this file")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv demo``: returns the exit code."""
    for name, low in (("new_tokens", 4), ("context", 256), ("compression", 1), ("budget", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    summary = run_demo(budget=args.budget, context=args.context, compression=args.compression,
                       new_tokens=args.new_tokens, compile=args.compile, seed=args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
