"""lm-evaluation-harness's own RULER tasks through the budgeted cache, offline and resumable.

Each cell is one method at one context length and prefill compression: lm-eval generates the samples locally
(``wonderwords``, ``nltk``), runs ``generate_until`` through the ``momentkv`` model (or stock HF for the full
cache) and scores them. The decode budget is RULER's longest answer (128 tokens), so no method evicts while
answering and the cells compare prefill selections at equal memory: ``length / compression + 128`` slots per
layer and KV head. Tasks whose haystack or questions are downloaded are listed as not run.
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

from .models import default_device, smollm2_checkpoint
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
}


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
def warm_up() -> None:
    """Build one small RULER task, once per process (see :func:`_fresh_task_modules`)."""
    from lm_eval.tasks import TaskManager

    import_quietly()
    _fresh_task_modules()
    metadata = {"max_seq_lengths": [1024], "tokenizer": str(smollm2_checkpoint())}
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


def language_model(method: str, length: int, compression: int, batch: int) -> Any:
    """lm-eval's model for ``method``: stock HF for the full cache, else ``momentkv`` with a prefill budget of
    ``length / compression`` and the decode budget."""
    from lm_eval.models.huggingface import HFLM

    from .lm_eval_adapter import MomentKVLM

    options = METHODS[method]
    if options is None:
        return HFLM(pretrained=str(smollm2_checkpoint()), dtype="float32", batch_size=batch, device=default_device())
    return MomentKVLM(pretrained="smollm2", dtype="float32", batch_size=batch, budget=DECODE_BUDGET,
                      prefill_budget=length // compression, **options)


def evaluate(method: str, length: int, compression: int, tasks: list[str], limit: int,
             batch: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Score (the fraction of answers found) and a digest of the samples, task by task, for one cell.

    One ``simple_evaluate`` per task, each from freshly executed task modules (:func:`_fresh_task_modules`), so
    that a task gets the same samples whichever tasks or methods ran before (the digests check it).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = language_model(method, length, compression, batch)
    metadata = {"max_seq_lengths": [length], "tokenizer": str(smollm2_checkpoint())}
    warm_up()
    for task in tasks:
        _fresh_task_modules()
        manager = TaskManager(metadata=metadata)
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                      apply_chat_template=True, log_samples=True)
        docs = json.dumps([s["doc"] for s in out["samples"][task]], sort_keys=True, default=str)
        yield task, dict(score=float(out["results"][task][f"{length},none"]),
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


def cell_key(method: str, length: int, compression: int, task: str) -> str:
    return f"{method}/{length}/x{compression}/{task}"


def run(path: Path, methods: list[str], lengths: list[int], compressions: list[int], tasks: list[str], limit: int,
        batch: int) -> dict[str, Any]:
    """Run every missing cell (the full cache once per length), saving after each task."""
    data = json.loads(path.read_text()) if path.exists() else {"limit": limit, "cells": {}}
    if data["limit"] != limit:
        raise ValueError(f"limit must match the file's ({data['limit']}) to extend it, got {limit}")
    for length in lengths:
        for method in methods:
            for compression in [1] if METHODS[method] is None else compressions:
                todo = [t for t in tasks if cell_key(method, length, compression, t) not in data["cells"]]
                if not todo:
                    continue
                for task, found in evaluate(method, length, compression, todo, limit, batch):
                    data["cells"][cell_key(method, length, compression, task)] = dict(**found, **versions())
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(data, indent=1))
    return data


def markdown(data: dict[str, Any]) -> str:
    """A table per length and compression: each task's score, its share of the full cache's, the average."""
    cells = {key: entry["score"] for key, entry in data["cells"].items()}
    tasks = [t for t in TASKS if any(key.endswith("/" + t) for key in cells)]
    runs = sorted({tuple(key.split("/")[1:3]) for key in cells if not key.startswith("full/")},
                  key=lambda lc: (int(lc[0]), int(lc[1][1:])))
    lines = [f"# lm-eval RULER (SmolLM2-135M-Instruct, {data['limit']} samples per task)", "",
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/eval/ruler.json"))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--lengths", default="4096", help="context lengths in tokens, comma-separated")
    parser.add_argument("--compressions", default="4", help="prefill budget = length / each, comma-separated")
    parser.add_argument("--tasks", default=",".join(TASKS), help="lm-eval RULER tasks, comma-separated")
    parser.add_argument("--limit", type=int, default=8, help="samples per task (lm-eval's --limit)")
    parser.add_argument("--batch", type=int, default=4, help="lm-eval's batch size")
    args = parser.parse_args(argv)
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    for name in methods:
        if name not in METHODS:
            raise SystemExit(f"--methods: unknown {name!r}; known: {', '.join(METHODS)}")
    for name in tasks:
        if name not in TASKS:
            raise SystemExit(f"--tasks: {name!r} is not an offline RULER task; known: {', '.join(TASKS)}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data = run(args.out, methods, [int(x) for x in args.lengths.split(",")],
               [int(x) for x in args.compressions.split(",")], tasks, args.limit, args.batch)
    args.out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
