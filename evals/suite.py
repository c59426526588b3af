"""``momentkv eval``: every workload x method x budget, resumable, results in one JSON file.

Each finished cell is written at once, so an interrupted run continues where it stopped.
The full-cache reference of a workload (tokens and log-probabilities) is computed once and
kept in the cache folder. Memory is compared as total cache tokens per KV head: the prompt
slots actually used plus the decode budget (or the prefill budget plus the decode budget).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import momentkv

from .fidelity import SAMPLING, full_cache_reference, loop_period, rouge_l, sampled_free_run, sampled_reference, stream
from .kvpress_fidelity import PRESSES, kvpress_rows
from .kvpress_generate import PRESSES as PREFILL_PRESSES
from .methods import FULL, METHODS, method
from .models import DEFAULT_MODEL, OFFLINE_MODELS, cache_home, chat_prompt, checkpoint, load
from .provenance import versions
from .ratios import kept_tokens, prefill_budget
from .workloads import (
    RETRIEVAL_TASKS,
    documents,
    long_answer_requests,
    passage_requests,
    retrieval_samples,
    retrieval_score,
)

# kvpress's presses: its decoding press around each scorer (at a decode budget), and its prefill presses (at a ratio)
KVPRESS = tuple(f"kvpress-{p}" for p in dict.fromkeys((*PRESSES, *PREFILL_PRESSES)))


def is_kvpress(name: str) -> bool:
    return name.startswith("kvpress-")


def kvpress_applies(name: str, workload: str, extra: dict[str, Any]) -> bool:
    """Whether kvpress's press ``name`` has a cell here: a prefill press at a ratio (long prompts), its decoding
    press at a decode budget (teacher-forced generation)."""
    press = name.removeprefix("kvpress-")
    if "ratio" in extra:
        return press in PREFILL_PRESSES
    return workload in GENERATION and not extra and press in PRESSES


ANSWER_TOKENS = 32  # new tokens generated per retrieval answer

WORKLOADS = ("sweep", "long-generation", "sweep-sampled", "long-generation-sampled", "long-prompt",
             "long-prompt-ratios", "perplexity", "retrieval")
GENERATION = ("sweep", "long-generation", "sweep-sampled", "long-generation-sampled")
# "-sampled": along references sampled from the full cache (fidelity.SAMPLING, a seed per prompt), as users
# generate long text; the plain workloads go along the full cache's greedy text. "long-prompt-ratios": the long
# prompts at kvpress's compression ratios, each method keeping the same prompt tokens, none evicting after.


@dataclass
class Settings:
    """What a run covers. The defaults are the full evaluation; CI and quick checks shrink them."""

    workloads: tuple[str, ...] = ("long-generation", "long-prompt", "long-prompt-ratios", "perplexity", "retrieval")
    methods: tuple[str, ...] = ()  # empty: every method
    budgets: tuple[int, ...] = (32, 64, 128, 256)
    prompts: int = 16
    new_tokens: int = 1024
    sweep_prompts: int = 8
    sweep_tokens: int = 256
    passages: int = 4
    passage_tokens: int = 2048
    passage_new_tokens: int = 256
    passage_prefill_budgets: tuple[int, ...] = (256,)
    passage_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.875)  # kvpress's leaderboard
    documents: int = 4
    document_tokens: int = 4096
    document_prompt: int = 32
    retrieval_lengths: tuple[int, ...] = (2048, 4096, 6144)
    retrieval_samples: int = 8
    retrieval_tasks: tuple[str, ...] = RETRIEVAL_TASKS
    compressions: tuple[int, ...] = (2, 4, 8)
    retrieval_budget: int = 32
    batch: int = 16

    def check(self) -> None:
        for name in self.workloads:
            if name not in WORKLOADS:
                raise ValueError(f"workloads: unknown {name!r}; known: {', '.join(WORKLOADS)}")
        for name in self.methods:
            if name not in KVPRESS and name != FULL:
                method(name)
        for name in self.retrieval_tasks:
            if name not in RETRIEVAL_TASKS:
                raise ValueError(f"retrieval_tasks: unknown {name!r}; known: {', '.join(RETRIEVAL_TASKS)}")
        for name in ("prompts", "new_tokens", "sweep_prompts", "sweep_tokens", "passages", "passage_tokens",
                     "passage_new_tokens", "documents", "retrieval_samples", "retrieval_budget", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.document_prompt < self.document_tokens:
            raise ValueError(f"document_prompt must be in [1, document_tokens), got {self.document_prompt}")
        for name in ("budgets", "compressions", "passage_prefill_budgets", "retrieval_lengths"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a non-empty list of ints >= 1, got {getattr(self, name)}")
        if not self.passage_ratios or any(not 0 < ratio < 1 for ratio in self.passage_ratios):
            raise ValueError(f"passage_ratios must be numbers in (0, 1), got {self.passage_ratios}")


SETTINGS_HELP = {
    "budgets": "decode budgets (slots per layer and KV head) every method runs at",
    "prompts": "long-generation: held-apart chat prompts",
    "new_tokens": "long-generation: tokens generated (teacher-forced along the full cache's)",
    "sweep_prompts": "sweep: held-apart prompts of the default-choosing sweep",
    "sweep_tokens": "sweep: tokens generated per prompt",
    "passages": "long-prompt: passages summarised",
    "passage_tokens": "long-prompt: prompt tokens per passage",
    "passage_new_tokens": "long-prompt: tokens generated per passage",
    "passage_prefill_budgets": "long-prompt: prefill budgets the prompt is compressed to",
    "passage_ratios": "long-prompt-ratios: kvpress's compression ratios; each prompt keeps int(its length x (1 - ratio)) tokens "
                      "for every method (kvpress's prefill presses among them), then answers with no eviction "
                      "(decode budget = passage-new-tokens)",
    "documents": "perplexity: documents streamed",
    "document_tokens": "perplexity: tokens per document",
    "document_prompt": "perplexity: tokens given as the prompt before streaming",
    "retrieval_lengths": "retrieval: prompt lengths in tokens",
    "retrieval_samples": "retrieval: samples per task and length",
    "retrieval_tasks": f"retrieval: tasks, of {', '.join(RETRIEVAL_TASKS)}",
    "compressions": "retrieval: prefill budget = prompt length / each of these",
    "retrieval_budget": "retrieval: decode budget while answering",
    "batch": "sequences per generate() call",
}


class Results:
    """The results file: settings, environment and one entry per finished cell."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"cells": {}}

    def done(self, key: str) -> bool:
        return key in self.data["cells"]

    def add(self, key: str, entry: dict[str, Any]) -> None:
        """Keep a finished cell, with the versions and commit that ran it, and write the file at once."""
        self.data["cells"][key] = {**entry, **versions()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.data, indent=1))
        os.replace(staging, self.path)

    def describe(self, settings: Settings, model_name: str) -> None:
        known = self.data.get("environment", {}).get("model", model_name)
        if known != model_name:
            raise ValueError(f"{self.path} holds cells of {known}, not {model_name}: give another --out")
        self.data["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
        self.data["environment"] = dict(model=model_name, torch=torch.__version__, python=platform.python_version(),
                                        threads=torch.get_num_threads(), machine=platform.machine())


def cell_key(workload: str, method_name: str, budget: int, *detail: Any) -> str:
    return "/".join(str(x) for x in (workload, method_name, budget, *detail))


def _cached(name: str, payload: Any, compute: Callable[[], Any]) -> Any:
    """A full-cache reference, computed once per exact input and kept under the cache folder."""
    digest = hashlib.sha256(repr(payload).encode()).hexdigest()[:16]
    path = cache_home() / "eval-references" / f"{name}-{digest}.pt"
    if path.exists():
        return torch.load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return value


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def method_configs(name: str, budget: int, extra: dict[str, Any], lengths: list[int]) -> list[tuple[Any, list[int]]]:
    """The configurations method ``name`` runs prompts of ``lengths`` tokens with, and which prompts each: one, or at
    a kvpress ratio one per prompt length (each keeping as many prompt tokens as the press would)."""
    if "ratio" not in extra:
        return [(method(name).config(budget, **extra), list(range(len(lengths))))]
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(length, []).append(row)
    sinks = method(name).config(budget).sinks
    return [(method(name).config(budget, prefill_budget=prefill_budget(length, extra["ratio"], sinks)), rows)
            for length, rows in groups.items()]


class Suite:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings,
                 results: Results, model_folder: str, kvpress_python: str | None = None):
        settings.check()
        self.model, self.tokenizer, self.settings, self.results = model, tokenizer, settings, results
        self.model_folder, self.kvpress_python = model_folder, kvpress_python
        if kvpress_python is None and any(is_kvpress(n) for n in settings.methods):
            raise ValueError("kvpress methods need --kvpress-python (a Python with kvpress 0.5.5 installed)")
        results.describe(settings, Path(model_folder).name)

    def methods(self, workload: str = "") -> list[str]:
        """Methods to run: kvpress's presses only on teacher-forced generation and at ratios, where they apply."""
        names = list(self.settings.methods) or [FULL, *METHODS] + (list(KVPRESS) if self.kvpress_python else [])
        return [n for n in names if workload in (*GENERATION, "long-prompt-ratios") or not is_kvpress(n)]

    def _kvpress(self, name: str, budget: int, extra: dict[str, Any], enc: Any, ref_tokens: Tensor,
                 ref_logprobs: Tensor, ref_top: Tensor) -> dict[str, Any]:
        """Teacher-forced fidelity of a kvpress press, in kvpress's own environment (see kvpress_fidelity.py)."""
        prompts = [ids[mask.bool()] for ids, mask in zip(enc.input_ids, enc.attention_mask)]
        rows = kvpress_rows(self.kvpress_python, self.model_folder, name.removeprefix("kvpress-"), budget, prompts,
                            ref_tokens, ref_logprobs, ref_top, ratio=extra.get("ratio"))
        return dict(top1=sum(rows["top1_rows"]) / len(prompts), kl=sum(rows["kl_rows"]) / len(prompts),
                    cache_tokens=self._memory(budget, extra, enc), **rows)

    def _memory(self, budget: int, extra: dict[str, Any], enc: Any) -> float:
        """Cache tokens per layer and KV head at the end, averaged over the prompts: the prompt slots kept plus the
        decode budget."""
        if "prefill_budget" in extra:
            return extra["prefill_budget"] + budget
        lengths = enc.attention_mask.sum(-1).tolist()
        if "ratio" in extra:
            lengths = [kept_tokens(n, extra["ratio"]) for n in lengths]
        return sum(lengths) / len(lengths) + budget

    # -- generation workloads -------------------------------------------------------------
    def _generation(self, workload: str, texts: list[str], new_tokens: int, free_run: bool,
                    budgets: list[tuple[int, dict[str, Any]]], progress: tqdm) -> None:
        """Teacher-forced top-1/KL (and free-run ROUGE-L) of each method along the full cache's text: greedy, or
        sampled from a seed per prompt (``-sampled`` workloads: the free run samples from the same seed)."""
        tok, s = self.tokenizer, self.settings
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_tokens = enc.attention_mask.sum(-1).float().mean().item()
        batches = _batches(len(texts), s.batch)
        sampled = workload.endswith("-sampled")
        seeds = list(range(len(texts)))

        def reference() -> tuple[Tensor, Tensor]:
            if sampled:
                return sampled_reference(self.model, enc.input_ids, enc.attention_mask, new_tokens, seeds)
            parts = [full_cache_reference(self.model, enc.input_ids[b], enc.attention_mask[b], new_tokens) for b in batches]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        # tokens driven along, their log-probabilities, and the full cache's most likely token at each step
        ref_tokens, ref_logprobs, *top = _cached(workload.removesuffix("-ratios"),  # the long prompts' reference
                                                 (Path(self.model_folder).name, texts, new_tokens)
                                                 + ((SAMPLING, seeds) if sampled else ()), reference)
        ref_top = top[0] if top else ref_tokens
        ref_texts = tok.batch_decode(ref_tokens, skip_special_tokens=True)
        for budget, extra in budgets:
            for name in self.methods(workload):
                if is_kvpress(name) and not kvpress_applies(name, workload, extra):
                    continue
                detail = ([f"prefill{extra['prefill_budget']}"] if "prefill_budget" in extra
                          else [f"r{extra['ratio']:g}"] if "ratio" in extra else [])
                key = cell_key(workload, name, budget, *detail)
                progress.set_postfix_str(key)
                if self.results.done(key):
                    progress.update()
                    continue
                start = time.perf_counter()
                if name == FULL:
                    loops = [loop_period(row) for row in ref_tokens]
                    entry = dict(top1=1.0, kl=0.0, cache_tokens=prompt_tokens + new_tokens,
                                 loop_period_rows=[p for p, _ in loops], loop_share_rows=[r for _, r in loops])
                    if free_run:
                        entry["rouge_l"] = 1.0
                elif is_kvpress(name):
                    entry = self._kvpress(name, budget, extra, enc, ref_tokens, ref_logprobs, ref_top)
                else:
                    rows = len(texts)
                    agree_rows, kl_rows, rouge = torch.zeros(rows), torch.zeros(rows), [0.0] * rows
                    lengths = enc.attention_mask.sum(-1).tolist()
                    for config, group in method_configs(name, budget, extra, lengths):
                        with momentkv.patched(self.model, config=config):
                            for b in _batches(len(group), s.batch):
                                index = torch.tensor(group[b])
                                out = stream(self.model, enc.input_ids[index], enc.attention_mask[index],
                                             ref_tokens[index], ref_logprobs[index], free_run=free_run and not sampled)
                                agree_rows[index] = (out.predicted == ref_top[index]).float().mean(-1)
                                kl_rows[index] = out.kl.mean(-1)
                                if free_run and not sampled:
                                    for row, free in zip(group[b], tok.batch_decode(out.free, skip_special_tokens=True)):
                                        rouge[row] = rouge_l(free, ref_texts[row])
                            if free_run and sampled:
                                index = torch.tensor(group)
                                free = sampled_free_run(self.model, enc.input_ids[index], enc.attention_mask[index],
                                                        new_tokens, [seeds[row] for row in group])
                                for row, text in zip(group, tok.batch_decode(free, skip_special_tokens=True)):
                                    rouge[row] = rouge_l(text, ref_texts[row])
                    entry = dict(top1=agree_rows.mean().item(), kl=kl_rows.mean().item(),
                                 cache_tokens=self._memory(budget, extra, enc),
                                 top1_rows=agree_rows.tolist(), kl_rows=kl_rows.tolist())
                    if free_run:
                        entry.update(rouge_l=sum(rouge) / len(rouge), rouge_l_rows=rouge)
                entry.update(budget=budget, seconds=time.perf_counter() - start, **extra)
                self.results.add(key, entry)
                progress.update()

    def _chat(self, messages: list[str]) -> list[str]:
        return [chat_prompt(self.tokenizer, m) for m in messages]

    # -- streaming perplexity ---------------------------------------------------------------
    def _perplexity(self, progress: tqdm) -> None:
        s = self.settings
        docs = torch.tensor(documents(self.tokenizer, s.documents, s.document_tokens))
        prompt, rest = docs[:, : s.document_prompt], docs[:, s.document_prompt:]
        mask = torch.ones_like(prompt)
        for budget in s.budgets:
            for name in self.methods("perplexity"):
                key = cell_key("perplexity", name, budget)
                progress.set_postfix_str(key)
                if self.results.done(key):
                    progress.update()
                    continue
                start = time.perf_counter()
                if name == FULL:  # one forward over each document is the full cache's streaming result
                    with torch.no_grad():
                        logits = torch.cat([self.model(docs[b]).logits for b in _batches(len(docs), s.batch)])
                    logprob = torch.log_softmax(logits[:, s.document_prompt - 1:-1].float(), -1)
                    nll = -logprob.gather(-1, rest[..., None]).squeeze(-1)
                    memory = s.document_tokens
                else:
                    with momentkv.patched(self.model, config=method(name).config(budget)):
                        nll = torch.cat([-stream(self.model, prompt[b], mask[b], rest[b], mask_eos=False).logprob
                                         for b in _batches(len(docs), s.batch)])
                    memory = s.document_prompt + budget
                rows = nll.mean(-1)
                self.results.add(key, dict(perplexity=math.exp(rows.mean().item()), nll_rows=rows.tolist(),
                                           cache_tokens=memory, budget=budget,
                                           seconds=time.perf_counter() - start))
                progress.update()

    # -- long-context retrieval ---------------------------------------------------------------
    def _retrieval(self, progress: tqdm) -> None:
        s, tok = self.settings, self.tokenizer
        budget = s.retrieval_budget
        for task in s.retrieval_tasks:
            for length in s.retrieval_lengths:
                samples = retrieval_samples(tok, task, length, s.retrieval_samples)
                texts = [chat_prompt(tok, x.message) + x.answer_prefix for x in samples]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                for compression in s.compressions:
                    for name in self.methods("retrieval"):
                        key = cell_key("retrieval", name, budget, task, length, f"x{compression}")
                        progress.set_postfix_str(key)
                        if self.results.done(key) or (name == FULL and compression != s.compressions[0]):
                            progress.update()
                            continue
                        start = time.perf_counter()
                        prefill = length // compression
                        outputs = []
                        if name == FULL:
                            outputs = self._answers(enc)
                            memory = enc.attention_mask.sum(-1).float().mean().item() + ANSWER_TOKENS
                        else:
                            with momentkv.patched(self.model, config=method(name).config(budget, prefill_budget=prefill)):
                                outputs = self._answers(enc)
                            memory = prefill + budget
                        scores = [retrieval_score(o, x.answers) for o, x in zip(outputs, samples)]
                        self.results.add(key, dict(accuracy=sum(scores) / len(scores), scores=scores,
                                                   outputs=outputs, cache_tokens=memory, budget=budget,
                                                   prefill_budget=None if name == FULL else prefill,
                                                   seconds=time.perf_counter() - start))
                        progress.update()

    def _answers(self, enc: Any) -> list[str]:
        outputs = []
        for b in _batches(enc.input_ids.shape[0], max(1, self.settings.batch // 4)):
            ids = enc.input_ids[b]
            out = self.model.generate(input_ids=ids, attention_mask=enc.attention_mask[b],
                                      max_new_tokens=ANSWER_TOKENS,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            outputs += self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return outputs

    # -- driver -------------------------------------------------------------------------------------
    def cells(self, workload: str) -> int:
        s, m = self.settings, len(self.methods(workload))
        return {"sweep": len(s.budgets) * m, "long-generation": len(s.budgets) * m,
                "sweep-sampled": len(s.budgets) * m, "long-generation-sampled": len(s.budgets) * m,
                "long-prompt": len(s.budgets) * m * (1 + len(s.passage_prefill_budgets)),
                "long-prompt-ratios": len(s.passage_ratios) * m,
                "perplexity": len(s.budgets) * m,
                "retrieval": len(s.retrieval_tasks) * len(s.retrieval_lengths) * len(s.compressions) * m}[workload]

    def run(self) -> None:
        s = self.settings
        with tqdm(total=sum(self.cells(w) for w in s.workloads), desc="momentkv eval", unit="cell") as progress:
            for workload in s.workloads:
                if workload in ("sweep", "sweep-sampled"):
                    texts = self._chat(long_answer_requests("heldout", s.sweep_prompts))
                    self._generation(workload, texts, s.sweep_tokens, False, [(b, {}) for b in s.budgets], progress)
                elif workload in ("long-generation", "long-generation-sampled"):
                    texts = self._chat(long_answer_requests("eval", s.prompts))
                    self._generation(workload, texts, s.new_tokens, True, [(b, {}) for b in s.budgets], progress)
                elif workload in ("long-prompt", "long-prompt-ratios"):
                    texts = self._chat(passage_requests(self.tokenizer, s.passages, s.passage_tokens))
                    grid = ([(b, extra) for b in s.budgets
                             for extra in [{}] + [dict(prefill_budget=p) for p in s.passage_prefill_budgets]]
                            if workload == "long-prompt" else [(s.passage_new_tokens, dict(ratio=r)) for r in s.passage_ratios])
                    self._generation(workload, texts, s.passage_new_tokens, True, grid, progress)
                elif workload == "perplexity":
                    self._perplexity(progress)
                else:
                    self._retrieval(progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv eval``'s options (every field of :class:`Settings`) and its epilog."""
    defaults = Settings()
    words = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    floats = lambda text: tuple(float(x) for x in text.split(",") if x)  # noqa: E731
    kinds = {"str": words, "int": ints, "float": floats}  # a tuple field's item type, from its annotation
    parser.epilog = (f"workloads: {', '.join(WORKLOADS)}. methods: {FULL} (the reference), {', '.join(METHODS)}; "
                     "each is described in evals/methods.py and docs/results.md. The default run takes "
                     "hours on a CPU; --workloads, --methods and --budgets narrow it.")
    parser.add_argument("--out", default="results/eval/fidelity.json",
                        help="results JSON; an existing file is resumed (finished cells are skipped)")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list(OFFLINE_MODELS),
                        help="the offline model (evals/models.py); a results file holds one model's cells")
    parser.add_argument("--workloads", type=words, default=",".join(defaults.workloads),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--methods", type=words, default="", help="comma-separated method names; empty: every one")
    for field in fields(Settings):
        name, value = field.name, getattr(defaults, field.name)
        if name in ("workloads", "methods"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=kinds[field.type.removeprefix("tuple[").split(",")[0]],
                                default=",".join(map(str, value)),  # argparse parses a string default
                                help=f"{SETTINGS_HELP[name]}, comma-separated")
        else:
            parser.add_argument(flag, type=int, default=value, help=SETTINGS_HELP[name])
    parser.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON"),
                        help="python of an environment with kvpress 0.5.5, to add its presses (default: $KVPRESS_PYTHON)")
    parser.add_argument("--report-only", action="store_true", help="only write the markdown table and plots")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv eval``: runs the cells not yet in ``--out``, then writes the report; returns the exit code."""
    from .report import write_report  # report imports this module

    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    try:
        settings.check()
    except ValueError as error:
        parser.error(str(error))
    results = Results(Path(args.out))
    if not args.report_only:
        torch.manual_seed(0)
        model, tokenizer = load(args.model)
        try:
            suite = Suite(model, tokenizer, settings, results, str(checkpoint(args.model)), args.kvpress_python)
        except ValueError as error:
            parser.error(str(error))
        suite.run()
    for path in write_report(results):
        print(f"wrote {path}")
    return 0
