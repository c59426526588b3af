"""lm-evaluation-harness's own RULER tasks through the budgeted cache, offline and resumable.

Each cell is one method at one context length and prefill compression: lm-eval generates the samples locally
(``wonderwords``, ``nltk``), runs ``generate_until`` through the ``momentkv`` model (stock HF for the full cache,
the ``kvpress`` model for kvpress's presses) and scores them. The decode budget is RULER's longest answer (128
tokens), so no method evicts while answering and the cells compare prefill selections at equal memory. A
compression is either ``x4`` (a prefill budget of ``length / 4`` for every prompt: ``--compressions``) or kvpress's
``r0.75`` (each prompt keeps ``kept_tokens(its length, 0.75)``, as a kvpress press at ratio 0.75 does, batch 1:
``--ratios``; kvpress's presses run at ratios only). Every method compresses the whole prompt, question included.
Tasks whose haystack or questions are downloaded are listed as not run.
Usage: python -m momentkv.evals.ruler --out results/eval/ruler.json --lengths 4096 --compressions 4 --limit 8
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from momentkv import MomentKVConfig

from .intervals import bootstrap_mean, paired_difference
from .kvpress_generate import PRESSES
from .models import DEFAULT_MODEL, OFFLINE_MODELS, checkpoint, default_device, offline_model
from .provenance import versions

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
NOT_RUN = {
    "niah_single_2, niah_single_3, niah_multikey_1, niah_multiquery, niah_multivalue":
        "haystack of Paul Graham's essays, downloaded from the hub",
    "ruler_qa_squad, ruler_qa_hotpot": "questions from SQuAD and HotpotQA, downloaded from the hub",
}
DECODE_BUDGET = 128  # RULER's longest answer (max_gen_toks): answering evicts nothing
# model arguments of each method on top of the budgets; None is stock HF, the full cache
_SCORED_ALONE = {"prefill_carry": 0}  # pinned: these cells were measured before prefill_carry=10 became the default
METHODS: dict[str, dict[str, Any] | None] = {
    "full": None,
    "momentkv": _SCORED_ALONE,
    "momentkv-kept": {"protect_prompt": True},
    "streamingllm": {"preset": "streamingllm"},
    "snapkv": {"preset": "snapkv"},
    # why the multi-key needle is lost at 2k: without the correction, each layer choosing alone, slow momentum,
    # a longer recent window in the prefill selection
    "momentkv-plain": {**_SCORED_ALONE, "correction": "none"},
    "momentkv-vote0": {**_SCORED_ALONE, "prefill_vote": 0.0},
    "momentkv-a99": {**_SCORED_ALONE, "alpha": 0.99},
    "momentkv-w256": {**_SCORED_ALONE, "recent_window": 256},
    # the default since issue 25: each prompt token takes the best prefill score of the 10 before it (the value
    # after the asked key)
    "momentkv-carry10": {"prefill_carry": 10},
    # the default with a 64-token window at prefill (the decode budget's 128 by default): the window crowded the
    # vote out of the long prompts' selection at ratio 0.875 (docs/results.md)
    "momentkv-carry10-w64": {"prefill_carry": 10, "recent_window": 64},
    # the prompt scored by its last token's attention alone (as TOVA), which closed most of TOVA's lead at ratio 0.5
    "momentkv-carry10-obs1": {"prefill_carry": 10, "observation_window": 1},
}
KVPRESS = {f"kvpress-{press}": press for press in PRESSES}  # kvpress's prefill presses, in kvpress's environment
RATIOS_DEFAULT = "0.25,0.5,0.75,0.875"  # kvpress's leaderboard


def is_default(method: str) -> bool:
    """Whether ``method`` runs momentkv's default configuration (the row the tables compare with the presses)."""
    options = METHODS.get(method)
    return options is not None and MomentKVConfig(DECODE_BUDGET, **options) == MomentKVConfig(DECODE_BUDGET)


@functools.cache
def import_quietly() -> None:
    """lm-eval's RULER module fetches nltk's punkt_tab as it is imported, then prints "Downloaded punkt_tab"
    whatever happened (offline: a download error, then that). Import it once with its output held back, and say
    plainly what is missing: RULER's essay haystacks need punkt_tab, the tasks run offline here do not."""
    import nltk

    download, held = nltk.download, io.StringIO()
    nltk.download = functools.partial(download, quiet=True, print_error_to=held)  # its errors' stream is bound early
    try:
        with contextlib.redirect_stdout(held):
            importlib.import_module("lm_eval.tasks.ruler.prepare_niah")
    finally:
        nltk.download = download
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        print("nltk's punkt_tab is not installed and could not be downloaded: RULER's essay haystacks need it "
              "(python -m nltk.downloader punkt_tab), the tasks momentkv runs offline do not", file=sys.stderr)


@functools.cache
def warm_up(model: str = DEFAULT_MODEL) -> None:
    """Build one small RULER task, once per process (see :func:`_fresh_task_modules`)."""
    from lm_eval.tasks import TaskManager

    import_quietly()
    _fresh_task_modules()
    metadata = {"max_seq_lengths": [1024], "tokenizer": str(checkpoint(model))}
    TaskManager(metadata=metadata).load_task_or_group(["niah_single_1"])


def _fresh_task_modules() -> None:
    """Drop the RULER modules lm-eval's task loader cached, so that the next build executes them afresh.

    lm-eval seeds Python's and NumPy's generators at each ``simple_evaluate``, but keeps the modules its task files
    name (in ``sys.modules``, marked ``__mtime__``), and RULER's common-words module draws from a generator of its
    own: reused, a second method would get other samples. The first build of a process also draws differently
    (measured: the same samples from the second build on), hence one warm-up build per process."""
    for name in [n for n, module in sys.modules.items()
                 if n.startswith("lm_eval.tasks.ruler.") and hasattr(module, "__mtime__")]:
        del sys.modules[name]


def language_model(method: str, length: int, compression: str, batch: int, kvpress_python: str | None = None,
                   model: str = DEFAULT_MODEL) -> Any:
    """lm-eval's model for ``method`` at ``compression`` ("x4": a prefill budget of ``length / 4``; "r0.75":
    kvpress's ratio, batch 1): stock HF for the full cache, ``kvpress`` for a press, else ``momentkv`` with the
    decode budget."""
    from lm_eval.models.huggingface import HFLM

    from .kvpress_lm import KVPressLM
    from .lm_eval_adapter import MomentKVLM

    common = dict(dtype="float32", device=default_device())
    if method in KVPRESS:
        return KVPressLM(pretrained=model, press=KVPRESS[method], compression_ratio=float(compression[1:]),
                         python=kvpress_python, **common)
    options = METHODS[method]
    if options is None:
        return HFLM(pretrained=str(checkpoint(model)), batch_size=batch, **common)
    if compression.startswith("r"):
        return MomentKVLM(pretrained=model, batch_size=1, budget=DECODE_BUDGET,
                          compression_ratio=float(compression[1:]), **options, **common)
    return MomentKVLM(pretrained=model, batch_size=batch, budget=DECODE_BUDGET,
                      prefill_budget=length // int(compression[1:]), **options, **common)


def evaluate(method: str, length: int, compression: str, tasks: list[str], limit: int, batch: int,
             kvpress_python: str | None = None, model: str = DEFAULT_MODEL) -> Iterator[tuple[str, dict[str, Any]]]:
    """Score (the fraction of answers found), each sample's score and a digest of the samples, task by task, for
    one cell.

    One ``simple_evaluate`` per task, each from freshly executed task modules (:func:`_fresh_task_modules`), so
    that a task gets the same samples whichever tasks or methods ran before (the digests check it).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = language_model(method, length, compression, batch, kvpress_python, model)
    metadata = {"max_seq_lengths": [length], "tokenizer": str(checkpoint(model))}
    warm_up(model)
    for task in tasks:
        _fresh_task_modules()
        manager = TaskManager(metadata=metadata)
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                      apply_chat_template=lm.tokenizer.chat_template is not None, log_samples=True)
        docs = json.dumps([s["doc"] for s in out["samples"][task]], sort_keys=True, default=str)
        yield task, dict(score=float(out["results"][task][f"{length},none"]),
                         scores=[float(s[str(length)]) for s in out["samples"][task]],
                         samples=hashlib.sha1(docs.encode()).hexdigest()[:12], answers=answers(out["samples"][task]))


def answers(samples: list[dict[str, Any]]) -> list[list[str | bool]]:
    """[expected, answered, whether the answer occurs in the context] per sample, from lm-eval's logged samples:
    on the needle tasks a miss that occurs is the model's (another key's value), one that does not is made up
    (say, from fragments of the values a compressed cache kept)."""
    return [[" / ".join(map(str, s["doc"]["outputs"])), s["filtered_resps"][0],
             _occurs(s["filtered_resps"][0].strip().rstrip("."), s["doc"]["input"])] for s in samples]


def _occurs(answer: str, context: str) -> bool:
    """Whether ``answer`` occurs in ``context`` as a whole (not inside a longer word or number)."""
    return bool(answer) and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", context) is not None


def cell_key(method: str, length: int, compression: str, task: str) -> str:
    return f"{method}/{length}/{compression}/{task}"


def compressions_of(method: str, compressions: list[str]) -> list[str]:
    """The compressions ``method`` runs at: none for the full cache, kvpress's ratios alone for a press."""
    if method in KVPRESS:
        return [c for c in compressions if c.startswith("r")]
    return ["x1"] if METHODS[method] is None else compressions


def run(path: Path, methods: list[str], lengths: list[int], compressions: list[str], tasks: list[str], limit: int,
        batch: int, kvpress_python: str | None = None, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """Run every missing cell (the full cache once per length), saving after each task. A file holds one model's
    cells (files from before the model was recorded are SmolLM2's)."""
    data = json.loads(path.read_text()) if path.exists() else {"limit": limit, "model": model, "cells": {}}
    if data["limit"] != limit:
        raise ValueError(f"limit must match the file's ({data['limit']}) to extend it, got {limit}")
    if data.get("model", DEFAULT_MODEL) != model:
        raise ValueError(f"{path} holds cells of {data.get('model', 'smollm2')}, not {model}: give another --out")
    for length in lengths:
        for method in methods:
            for compression in compressions_of(method, compressions):
                todo = [t for t in tasks if cell_key(method, length, compression, t) not in data["cells"]]
                if not todo:
                    continue
                for task, found in evaluate(method, length, compression, todo, limit, batch, kvpress_python, model):
                    data["cells"][cell_key(method, length, compression, task)] = dict(**found, **versions())
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(data, indent=1))
    return data


def markdown(data: dict[str, Any]) -> str:
    """A table per length and compression: each task's score, its share of the full cache's, the average."""
    cells = {key: entry["score"] for key, entry in data["cells"].items()}
    tasks = [t for t in TASKS if any(key.endswith("/" + t) for key in cells)]
    runs = sorted({tuple(key.split("/")[1:3]) for key in cells if not key.startswith("full/") and "/x" in key},
                  key=lambda lc: (int(lc[0]), int(lc[1][1:])))
    name = offline_model(data.get("model", DEFAULT_MODEL)).checkpoint
    lines = [f"# lm-eval RULER ({name}, {data['limit']} samples per task)", "",
             "Score: fraction of the answers found (lm-eval's RULER metric); in parentheses, the share of the full "
             f"cache's score. Decode budget {DECODE_BUDGET} for every method.", ""]
    for length, compression in runs:
        budget = int(length) // int(compression[1:])
        lines += [f"## {length} tokens, prefill budget {budget} ({compression}, {budget + DECODE_BUDGET} cache slots)",
                  "", "| method | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
        full = [cells.get(f"full/{length}/x1/{t}") for t in tasks]
        for method in METHODS:
            key = "x1" if METHODS[method] is None else compression
            scores = [cells.get(f"{method}/{length}/{key}/{t}") for t in tasks]
            if all(s is None for s in scores):
                continue
            row = [("—" if s is None else f"{s:.2f}" + ("" if METHODS[method] is None or not f else f" ({s / f:.0%})"))
                   for s, f in zip(scores, full)]
            mean = None if None in scores else sum(scores) / len(scores)
            lines.append(f"| {method} | " + " | ".join(row) + f" | {'—' if mean is None else f'{mean:.3f}'} |")
        lines.append("")
    lines += ratio_tables(data)
    digests: dict[tuple[str, str], set] = {}
    for key, entry in data["cells"].items():
        _, length, _, task = key.split("/")
        digests.setdefault((length, task), set()).add(entry["samples"])
    differ = [f"{task} at {length}" for (length, task), found in sorted(digests.items()) if len(found) > 1]
    if differ:
        lines += [f"**Warning: the methods saw different samples for {', '.join(differ)}.**", ""]
    lines += needle_misses(data)
    lines += ["Not run (offline machine):", ""] + [f"- {names}: {why}" for names, why in NOT_RUN.items()]
    return "\n".join(lines) + "\n"


def _interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if signed else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def ratio_tables(data: dict[str, Any]) -> list[str]:
    """Per length: the average over tasks by method and kvpress ratio with 95% bootstrap intervals, the best press
    at each ratio and momentkv's default against it (paired on the same samples); then each ratio's tasks."""
    cells = data["cells"]
    parts = [key.split("/") for key in cells]
    lines = []
    for length in sorted({int(length) for _, length, compression, _ in parts if compression.startswith("r")}):
        ratios = sorted({c for _, n, c, _ in parts if int(n) == length and c.startswith("r")}, key=lambda c: float(c[1:]))
        tasks = [t for t in TASKS if any(int(n) == length and c in ratios and task == t for _, n, c, task in parts)]

        def scores(method: str, ratio: str) -> list[list[float]] | None:
            found = [cells.get(cell_key(method, length, "x1" if METHODS.get(method, {}) is None else ratio, task))
                     for task in tasks]
            return None if any(f is None or "scores" not in f for f in found) else [f["scores"] for f in found]

        methods = [m for m in (*METHODS, *KVPRESS) if any(scores(m, r) for r in ratios)]
        presses = [m for m in methods if m in KVPRESS]
        lines += [f"## {length} tokens at kvpress's compression ratios", "",
                  f"Average over {', '.join(tasks)} (each task's mean over its {data['limit']} samples), 95% bootstrap "
                  "interval in brackets. At ratio r each prompt keeps int(its length x (1 - r)) tokens for every "
                  f"method (kvpress's count), then answers with up to {DECODE_BUDGET} more; kvpress's presses in "
                  "kvpress 0.5.5's own environment, batch 1. The default against the best press: the difference on "
                  "the same samples, 95% paired interval; a win or a loss only where it excludes 0.", "",
                  "| method | " + " | ".join(r[1:] for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for method in methods:
            row = [scores(method, r) for r in ratios]
            name = f"{method} (the default)" if is_default(method) else method
            lines.append(f"| {name} | " + " | ".join("—" if s is None else _interval(*bootstrap_mean(s)) for s in row)
                         + " |")
        best = [max((m for m in presses if scores(m, r)), key=lambda m: bootstrap_mean(scores(m, r))[0], default=None)
                for r in ratios]
        lines.append("| best press | " + " | ".join("—" if b is None else f"{b} {bootstrap_mean(scores(b, r))[0]:.3f}"
                                                    for b, r in zip(best, ratios)) + " |")
        default = next((m for m in methods if is_default(m)), None)
        if default is not None:
            row = []
            for b, r in zip(best, ratios):
                ours, theirs = scores(default, r), b and scores(b, r)
                if ours is None or not theirs:
                    row.append("—")
                    continue
                mean, low, high = paired_difference(ours, theirs)
                verdict = "win" if low > 0 else "loss" if high < 0 else "within the interval"
                best_mean = bootstrap_mean(theirs)[0]
                share = f" ({bootstrap_mean(ours)[0] / best_mean:.0%} of it)" if best_mean else ""
                row.append(f"{_interval(mean, low, high, signed=True)} {verdict}{share}")
            lines.append(f"| {default} - best press | " + " | ".join(row) + " |")
        lines.append("")
        for ratio in ratios:
            lines += [f"### {length} tokens, ratio {ratio[1:]}: each task", "",
                      "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
            for method in methods:
                if (found := scores(method, ratio)) is not None:
                    lines.append(f"| {method} | " + " | ".join(f"{sum(s) / len(s):.2f}" for s in found) + " |")
            lines.append("")
    return lines


def needle_misses(data: dict[str, Any]) -> list[str]:
    """A table of the needle cells that kept their answers: answers found (every expected value in the answer, as
    RULER scores), misses that name another value from the context (the model's mistake), and misses that occur
    nowhere in it (made up)."""
    rows = []
    for key, entry in data["cells"].items():
        if "answers" in entry and key.split("/")[-1].startswith("niah_"):
            found = [all(v.lower() in answer.lower() for v in expected.split(" / "))
                     for expected, answer, _ in entry["answers"]]
            misses = [occurs for (_, _, occurs), hit in zip(entry["answers"], found) if not hit]
            rows.append(f"| {key} | {sum(found)} | {sum(misses)} | {len(misses) - sum(misses)} |")
    if not rows:
        return []
    return ["## Needle misses", "", "Of each cell's answers: found, another value from the context, made up (in the "
            "context nowhere as a whole value).", "", "| cell | found | another value | made up |", "|---|---|---|---|",
            *rows, ""]


def _compressions(args: argparse.Namespace) -> list[str]:
    """``--compressions`` as "x4" keys and ``--ratios`` as "r0.75" keys; without either, x4."""
    keys = []
    for text in (args.compressions or "").split(","):
        if text and (not text.isdigit() or int(text) < 1):
            raise SystemExit(f"--compressions: each must be an integer >= 1 (prefill budget = length / it), got {text!r}")
        keys += [f"x{int(text)}"] if text else []
    for text in (args.ratios or "").split(","):
        try:
            ratio = float(text) if text else None
        except ValueError:
            ratio = -1.0
        if ratio is not None and not 0 < ratio < 1:
            raise SystemExit(f"--ratios: each must be a number in (0, 1) (the share of the prompt evicted), got {text!r}")
        keys += [f"r{ratio:g}"] if text else []
    return keys or ["x4"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    known = [*METHODS, *KVPRESS]
    parser.add_argument("--out", type=Path, default=Path("results/eval/ruler.json"))
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list(OFFLINE_MODELS),
                        help="the offline model (evals/models.py); a file holds one model's cells")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(known)}")
    parser.add_argument("--lengths", default="4096", help="context lengths in tokens, comma-separated")
    parser.add_argument("--compressions", help="prefill budget = length / each, comma-separated (default 4, unless "
                                               "--ratios is given)")
    parser.add_argument("--ratios", help=f"kvpress's compression ratios, comma-separated (its leaderboard's: "
                                         f"{RATIOS_DEFAULT}); each prompt keeps int(length x (1 - ratio)) tokens")
    parser.add_argument("--tasks", default=",".join(TASKS), help="lm-eval RULER tasks, comma-separated")
    parser.add_argument("--limit", type=int, default=8, help="samples per task (lm-eval's --limit)")
    parser.add_argument("--batch", type=int, default=4, help="lm-eval's batch size (1 at --ratios)")
    parser.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON"),
                        help="python of an environment with kvpress 0.5.5, for kvpress-* methods (default: $KVPRESS_PYTHON)")
    args = parser.parse_args(argv)
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    for name in methods:
        if name not in known:
            raise SystemExit(f"--methods: unknown {name!r}; known: {', '.join(known)}")
    for name in tasks:
        if name not in TASKS:
            raise SystemExit(f"--tasks: {name!r} is not an offline RULER task; known: {', '.join(TASKS)}")
    compressions = _compressions(args)
    if any(m in KVPRESS for m in methods) and not args.kvpress_python:
        raise SystemExit("--kvpress-python: kvpress-* methods need a Python with kvpress 0.5.5 (or $KVPRESS_PYTHON)")
    if any(m in KVPRESS for m in methods) and not any(c.startswith("r") for c in compressions):
        raise SystemExit("--ratios: kvpress-* methods run at kvpress's compression ratios only; give --ratios")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data = run(args.out, methods, [int(x) for x in args.lengths.split(",")], compressions, tasks, args.limit,
               args.batch, args.kvpress_python, args.model)
    args.out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))

if __name__ == "__main__":
    main()
