"""End-to-end decoding benchmark: momentkv against the full cache and kvpress, same model and lengths.

Systems (decode tokens/s, per-step latency, KV bytes, process memory growth):
  full-dynamic          transformers' dynamic cache, eager
  full-static-compiled  transformers' static cache, decode step compiled (the official recipe)
  momentkv-eager        momentkv, eager
  momentkv-compiled     momentkv, decode step compiled (fullgraph)
  momentkv-cudagraphs   momentkv, compiled with mode="reduce-overhead" (CUDA only)
  kvpress-i1, -i16      kvpress DecodingPress(StreamingLLMPress) every 1 / 16 steps, in its own
                        environment (``--kvpress-python``), same total cache size as momentkv
Runs are interleaved (every system once per repeat), compiled graphs warmed per shape before
timing, medians over repeats; ratios are taken within each repeat, then their median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from statistics import median
from typing import Any

import torch
from transformers import CompileConfig, StaticCache, StoppingCriteriaList

import momentkv
from momentkv.patches.private_api import compile_on_any_device
from momentkv.patching import GENERATE_CACHE_ARG

SYSTEMS = ("full-dynamic", "full-static-compiled", "momentkv-eager", "momentkv-compiled", "momentkv-cudagraphs",
           "kvpress-i1", "kvpress-i16")

from .competing_load import competing_load
from .provenance import versions
from .step_timer import StepTimer, held_bytes, kv_bytes

_COMPILE_CONFIGS: dict[str, CompileConfig] = {}


def compile_mode(system: str, device: torch.device) -> str | None:
    """How ``system`` is compiled: CUDA graphs ("reduce-overhead") for momentkv-cudagraphs and, on CUDA, for the
    static cache (transformers' own default for it); inductor alone for the other compiled systems."""
    if system == "momentkv-cudagraphs" or (system == "full-static-compiled" and device.type == "cuda"):
        return "reduce-overhead"
    return "default" if system.endswith("compiled") else None


def _compile_config(mode: str) -> CompileConfig:
    """One config object per mode: transformers keeps its compiled call while the config is the same object."""
    if mode not in _COMPILE_CONFIGS:
        _COMPILE_CONFIGS[mode] = compile_on_any_device(CompileConfig(fullgraph=True, dynamic=False, mode=mode))
    return _COMPILE_CONFIGS[mode]


def _generate(model, ids, new_tokens: int, timer: StepTimer | None, full_cache: bool = False, **kwargs):
    """``full_cache``: transformers' own generate, bypassing momentkv's (the model's attention is then its own)."""
    criteria = StoppingCriteriaList([timer] if timer else [])
    generate = type(model).generate.__get__(model) if full_cache else model.generate
    return generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, stopping_criteria=criteria,
                    return_dict_in_generate=True, **kwargs)


def kvpress_interval(system: str) -> int:
    """The steps between two compressions of ``kvpress-iN``."""
    return int(system.split("-i")[1])


def run_system(system: str, model, ids, new_tokens: int, budget: int, kvpress_python: str | None,
               model_folder: str, timed: bool = True, deadline: float | None = None,
               sampling: dict | None = None) -> dict[str, Any]:
    """One generation of ``new_tokens`` tokens; returns timings and memory (or an 'error').

    ``model`` is patched by momentkv with ``budget``; full-cache systems bypass momentkv's ``generate``,
    which leaves the model's own attention in charge. A ``deadline`` (``time.perf_counter()``) stops the
    generation early: ``decode_steps`` then says how far it got. ``sampling`` (generate's options) is passed to
    kvpress's runner only; the others decode greedily here."""
    batch, prompt_len = ids.shape
    device = ids.device
    tokens = new_tokens if timed else 4
    if system.startswith("kvpress"):
        if not kvpress_python:
            return {"error": "no --kvpress-python given"}
        args = dict(model=model_folder, prompt_len=prompt_len, new_tokens=tokens, batch=batch, device=device.type,
                    dtype=str(model.dtype).replace("torch.", ""), target=prompt_len + budget,
                    interval=kvpress_interval(system), **({"sampling": sampling} if sampling else {}))
        runner = Path(__file__).with_name("kvpress_runner.py")
        done = subprocess.run([kvpress_python, str(runner), json.dumps(args)], capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr else "kvpress failed"}
        return json.loads(done.stdout.strip().splitlines()[-1])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device, deadline)
    if system == "full-dynamic":
        out = _generate(model, ids, tokens, timer, full_cache=True, disable_compile=True)
        result = dict(kv_bytes=kv_bytes(getattr(out, GENERATE_CACHE_ARG)))
    elif system == "full-static-compiled":
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
        _generate(model, ids, tokens, timer, full_cache=True, **{GENERATE_CACHE_ARG: cache},
                  compile_config=_compile_config(compile_mode(system, device)))
        result = dict(kv_bytes=kv_bytes(cache))
    else:
        mode = compile_mode(system, device)
        extra = {"compile_config": _compile_config(mode)} if mode else {"disable_compile": True}
        _generate(model, ids, tokens, timer, **extra)
        cache = momentkv.state_of(model).cache
        layers = cache.budgeted_layers
        result = dict(kv_bytes=sum(layer.keys.nbytes + layer.values.nbytes for layer in layers),
                      cache_bytes=held_bytes(cache))
    result.update(timer.summary(batch))
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def run_bench(model, model_folder: str, prompt_len: int, lengths: list[int], budgets: list[int],
              batches: list[int], systems: list[str], repeats: int, kvpress_python: str | None,
              log=print, competing: int = 0) -> dict[str, Any]:
    """Every system at every batch, length and budget, ``repeats`` times interleaved (warm-ups apart), the timed
    runs beside ``competing`` busy processes (``evals/competing_load.py``)."""
    torch._dynamo.config.cache_size_limit = 64  # one graph per system and shape, all kept
    device = model.device
    rows = []
    for batch in batches:
        ids = torch.randint(10, model.config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(0)).to(device)
        for new_tokens in lengths:
            full: dict[tuple, list[dict]] = {}  # the full caches' runs, made beside the first budget only
            for budget in budgets:
                block = [s for s in systems if not (full and s.startswith("full"))]
                with momentkv.patched(model, budget=budget):
                    for system in block:  # warm-up: compile every graph at its real shape
                        if "compiled" in system or "cudagraphs" in system:
                            run_system(system, model, ids, new_tokens, budget, kvpress_python, model_folder, False)
                    samples: dict[tuple, list[dict]] = {(s, budget): [] for s in block}
                    with competing_load(competing):
                        for repeat in range(repeats):
                            for system in block:
                                result = run_system(system, model, ids, new_tokens, budget, kvpress_python,
                                                    model_folder)
                                samples[(system, budget)].append(result)
                                log(f"batch {batch} new {new_tokens} budget {budget} repeat {repeat} {system}: "
                                    + (result.get("error") or f"{result['tokens_per_second']:.1f} tok/s"))
                fresh = not full
                full = full or {(s, None): runs for (s, _), runs in samples.items() if s.startswith("full")}
                samples.update({(s, budget): runs for (s, _), runs in full.items()})
                rows.extend(_summarise(samples, batch, prompt_len, new_tokens, budget, full_rows=fresh))
    result = dict(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                  threads=torch.get_num_threads(), dtype=str(model.dtype), model=model.config.model_type,
                  prompt_len=prompt_len, repeats=repeats, competing_processes=competing, versions=versions(),
                  rows=rows)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        result.update(world_size=torch.distributed.get_world_size(), per_rank=_per_rank_memory(rows))
    return result


MEMORY = ("kv_bytes", "cache_bytes", "rss_growth_bytes", "rss_peak_bytes", "cuda_peak_allocated_bytes")


def _per_rank_memory(rows: list[dict]) -> list[list[dict]]:
    """Each rank's memory per row (tensor parallelism: every rank holds its share of the heads)."""
    mine = [{key: row[key] for key in ("system", "budget", "batch", "new_tokens", *MEMORY) if key in row}
            for row in rows]
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def _summarise(samples: dict, batch: int, prompt_len: int, new_tokens: int, budget: int,
               full_rows: bool = True) -> list[dict]:
    """Rows of one (batch, length, budget) block: medians over repeats, ratios within each repeat (tokens/s, and
    per point of the step-time curve against each full cache). The full caches' rows come once per length
    (``full_rows``), with the budget they first ran beside."""
    rows = []
    for (system, _), runs in samples.items():
        if system.startswith("full") and not full_rows:
            continue
        ok = [r for r in runs if "error" not in r]
        row = dict(system=system, budget=budget, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
        if not ok:
            row["error"] = runs[0].get("error")
            rows.append(row)
            continue
        for key in ("tokens_per_second", "step_ms_median", "kv_bytes", "cache_bytes", "rss_growth_bytes",
                    "rss_peak_bytes", "cuda_peak_allocated_bytes"):
            values = [r[key] for r in ok if key in r]
            if values:
                row[key] = median(values)
        row["curve"] = _median_curve([r["curve"] for r in ok if "curve" in r])
        for other in ("full-static-compiled", "full-dynamic", "kvpress-i1", "kvpress-i16"):
            against = samples.get((other, budget))
            if other == system or not against or any("error" in r for r in against + runs):
                continue
            row[f"speed_vs_{other}"] = median(a["tokens_per_second"] / b["tokens_per_second"]
                                              for a, b in zip(runs, against))
            if other.startswith("full") and not system.startswith("full"):
                ratio = _median_curve([[[length, theirs / mine] for (length, mine), (_, theirs)
                                        in zip(a["curve"], b["curve"])] for a, b in zip(runs, against)])
                row[f"curve_speed_vs_{other}"] = ratio
                row[f"faster_than_{other}_from"] = _crossover(ratio)
        rows.append(row)
    return rows


def _median_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """Pointwise median of curves ([length, value] at the same lengths)."""
    if not curves:
        return []
    return [[points[0][0], median(p[1] for p in points)] for points in zip(*curves)]


def _crossover(ratio: list[list[float]]) -> int | None:
    """The first generated length from which a speed ratio stays above 1 (None: never, or not to the end)."""
    start = None
    for length, value in ratio:
        start = (start or length) if value > 1 else None
    return start


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['device']} ({result['threads']} threads) {result['model']} {result['dtype']}, prompt "
             f"{result['prompt_len']}, median of {result['repeats']}",
             f"{'system':22s} {'budget':>6s} {'batch':>5s} {'new':>6s} {'tok/s':>8s} {'step ms':>8s} "
             f"{'KV MiB':>8s} {'RSS MiB':>8s} {'x static':>8s} {'x dynamic':>9s} {'x kvp-i1':>8s} {'x kvp-i16':>9s}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['system']:22s} {str(r['budget']):>6s} {r['batch']:5d} {r['new_tokens']:6d}  {r['error']}")
            continue
        ratio = lambda other, width: f"{r.get(f'speed_vs_{other}', float('nan')):{width}.2f}"  # noqa: E731
        lines.append(
            f"{r['system']:22s} {'-' if r['system'].startswith('full') else str(r['budget']):>6s} {r['batch']:5d} "
            f"{r['new_tokens']:6d} {r['tokens_per_second']:8.1f} {r['step_ms_median']:8.2f} "
            f"{r['kv_bytes'] / 2**20:8.2f} {r.get('rss_peak_bytes', float('nan')) / 2**20:8.0f} "
            f"{ratio('full-static-compiled', 8)} {ratio('full-dynamic', 9)} {ratio('kvpress-i1', 8)} "
            f"{ratio('kvpress-i16', 9)}")
    return "\n".join(lines + ["", format_curves(result)])


def _label(row: dict) -> str:
    return row["system"] + ("" if row["system"].startswith("full") else f" B={row['budget']}")


def format_curves(result: dict[str, Any]) -> str:
    """Decode tokens/s at each point of the generation, per system, for the longest runs of each batch."""
    lines = []
    for batch in sorted({r["batch"] for r in result["rows"]}):
        longest = max(r["new_tokens"] for r in result["rows"] if r["batch"] == batch)
        rows = [r for r in result["rows"] if r["batch"] == batch and r["new_tokens"] == longest and r.get("curve")]
        if not rows:
            continue
        lengths = [length for length, _ in rows[0]["curve"]]
        lines.append(f"batch {batch}, tokens/s at generated length: " + " ".join(f"{n:>7d}" for n in lengths))
        for r in rows:
            rates = " ".join(f"{1e3 * batch / ms:7.1f}" for _, ms in r["curve"])
            crossing = r.get("faster_than_full-dynamic_from")
            lines.append(f"  {_label(r):34s} {rates}" + (f"  (faster than dynamic from {crossing})"
                                                          if crossing else ""))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Tokens/s against generated length along the longest generation of the smallest batch, each momentkv
    budget's crossover with the dynamic full cache marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(r["batch"] for r in result["rows"])
    longest = max(r["new_tokens"] for r in result["rows"] if r["batch"] == batch)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        if r["batch"] != batch or r["new_tokens"] != longest or not r.get("curve"):
            continue
        lengths = [length for length, _ in r["curve"]]
        line, = ax.plot(lengths, [1e3 * batch / ms for _, ms in r["curve"]], marker="o", label=_label(r))
        crossing = r.get("faster_than_full-dynamic_from")
        if crossing:
            ax.axvline(crossing, color=line.get_color(), linestyle=":", linewidth=1)
            ax.annotate(f"faster from {crossing}", (crossing, ax.get_ylim()[0]), color=line.get_color(),
                        fontsize=7, rotation=90, va="bottom", ha="right")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("decode tokens/s (median over the steps just before)")
    ax.set_title(f"{result['model']} on {result['device']}, batch {batch}, prompt {result['prompt_len']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv bench``'s options."""
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 or gemma3-270m (the real SmolLM2-135M or Gemma 3 270M, offline), "
                             "llama-3.1-8b-random (Llama-3.1-8B's shapes, random weights) or a checkpoint folder; under torchrun the model is sharded by heads "
                             "(tensor parallelism) and every rank's memory is reported")
    parser.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when available")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (random ids)")
    parser.add_argument("--lengths", default="256,512", help="generated lengths, comma-separated")
    parser.add_argument("--budgets", default="64,256", help="momentkv budgets, comma-separated")
    parser.add_argument("--batches", default="1", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every run (the median is kept)")
    parser.add_argument("--systems", default="full-dynamic,full-static-compiled,momentkv-eager,momentkv-compiled,"
                                             "kvpress-i1,kvpress-i16",
                        help="comma-separated, of full-dynamic, full-static-compiled, momentkv-eager, "
                             "momentkv-compiled, momentkv-cudagraphs (CUDA only), kvpress-i1, kvpress-i16 (kvpress "
                             "only with --kvpress-python; see evals/bench.py)")
    parser.add_argument("--kvpress-python", default=None,
                        help="python of an environment with kvpress 0.5.5 (transformers < 5.3), to add its presses")
    parser.add_argument("--kv-caps", default=None,
                        help="throughput at memory caps (evals/capacity.py): KV caps such as 256M,1G; each system runs "
                             "the largest batch whose cache fits, for the first of --lengths tokens, from mixed-length "
                             "sampled prompts")
    parser.add_argument("--max-batch", type=int, default=64, help="with --kv-caps: the largest batch run (CPU time)")
    parser.add_argument("--competing", type=int, default=0,
                        help="time every run beside this many busy processes (a loaded machine; warm-ups apart)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--plot", default=None,
                        help="write a tokens/s plot (PNG) to this file: against generated length, or with --kv-caps "
                             "against the cap")


def _sizes(text: str) -> list[int]:
    """``256M,1G`` in bytes (K, M, G: powers of 1,024)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return [int(float(x[:-1]) * units[x[-1].upper()]) if x[-1:].upper() in units else int(x)
                for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--kv-caps: sizes such as 256M,1G, got {text!r}") from None


def _run_capacity(args: argparse.Namespace, parser: argparse.ArgumentParser, model, folder: str,
                  systems: list[str], ints) -> int:
    from .capacity import SYSTEMS as CAPACITY_SYSTEMS, format_table as capacity_table, plot as capacity_plot
    from .capacity import run_capacity

    unknown = [name for name in systems if name not in CAPACITY_SYSTEMS]
    if unknown:
        parser.error(f"--systems with --kv-caps: {', '.join(unknown)} not measured at a cap; known: "
                     f"{', '.join(CAPACITY_SYSTEMS)}")
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {args.max_batch}")
    try:
        caps = _sizes(args.kv_caps)
    except ValueError as error:
        parser.error(str(error))
    def save(result: dict) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    if any(name.startswith("kvpress") for name in systems) and not args.kvpress_python:
        parser.error("--systems: kvpress's rows need --kvpress-python (a Python with kvpress 0.5.5)")
    result = run_capacity(model, caps, args.prompt_len, ints(args.lengths)[0], ints(args.budgets), systems,
                          args.max_batch, save=save, kvpress_python=args.kvpress_python, model_folder=folder)
    print(capacity_table(result))
    if args.plot:
        capacity_plot(result, args.plot)
    return 0


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv bench``: returns the exit code."""
    from .models import bench_model, distributed

    systems = args.systems.split(",")
    unknown = [name for name in systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    if distributed() and any(name.startswith("kvpress") for name in systems):
        parser.error("--systems: kvpress runs in its own process, not under torchrun")
    if args.competing < 0:
        parser.error(f"--competing must be at least 0 (busy processes), got {args.competing}")
    if args.competing and args.kv_caps:
        parser.error("--competing loads the interleaved runs; --kv-caps runs each system once, so not under load")
    try:
        model, folder = bench_model(args.model, args.device)
    except ValueError as error:
        parser.error(str(error))
    first = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports for every rank
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    if args.kv_caps:
        return _run_capacity(args, parser, model, folder, systems, ints)
    result = run_bench(model, folder, args.prompt_len, ints(args.lengths), ints(args.budgets),
                       ints(args.batches), systems, args.repeats, args.kvpress_python,
                       log=print if first else lambda line: None, competing=args.competing)
    if first:
        print(format_table(result))
        for rank, rows in enumerate(result.get("per_rank", [])):
            held = ", ".join(f"{r['system']} {r.get('cache_bytes', r.get('kv_bytes', 0)) / 2**20:.2f} MiB"
                             for r in rows)
            print(f"rank {rank}: {held}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        if args.plot:
            plot(result, args.plot)
    if distributed():  # leave together: a rank exiting with the group alive can abort its peer's gloo threads
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0
