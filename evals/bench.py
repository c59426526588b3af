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

import json
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

from .provenance import versions
from .step_timer import StepTimer, kv_bytes

_COMPILE_CONFIGS: dict[str, CompileConfig] = {}


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


def run_system(system: str, model, ids, new_tokens: int, budget: int, kvpress_python: str | None,
               model_folder: str, timed: bool = True, deadline: float | None = None) -> dict[str, Any]:
    """One generation of ``new_tokens`` tokens; returns timings and memory (or an 'error').

    ``model`` is patched by momentkv with ``budget``; full-cache systems bypass momentkv's ``generate``,
    which leaves the model's own attention in charge. A ``deadline`` (``time.perf_counter()``) stops the
    generation early: ``decode_steps`` then says how far it got."""
    batch, prompt_len = ids.shape
    device = ids.device
    tokens = new_tokens if timed else 4
    if system.startswith("kvpress"):
        if not kvpress_python:
            return {"error": "no --kvpress-python given"}
        args = dict(model=model_folder, prompt_len=prompt_len, new_tokens=tokens, batch=batch, device=device.type,
                    dtype=str(model.dtype).replace("torch.", ""), target=prompt_len + budget,
                    interval=int(system.split("-i")[1]))
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
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        _generate(model, ids, tokens, timer, full_cache=True, **{GENERATE_CACHE_ARG: cache},
                  compile_config=_compile_config(mode))
        result = dict(kv_bytes=kv_bytes(cache))
    else:
        mode = {"momentkv-eager": None, "momentkv-compiled": "default", "momentkv-cudagraphs": "reduce-overhead"}
        compile_mode = mode[system]
        extra = {"compile_config": _compile_config(compile_mode)} if compile_mode else {"disable_compile": True}
        _generate(model, ids, tokens, timer, **extra)
        cache = momentkv.state_of(model).cache
        layers = cache.budgeted_layers
        result = dict(kv_bytes=sum(layer.keys.nbytes + layer.values.nbytes for layer in layers),
                      cache_bytes=cache.nbytes())
    result.update(timer.summary(batch))
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def run_bench(model, model_folder: str, prompt_len: int, lengths: list[int], budgets: list[int],
              batches: list[int], systems: list[str], repeats: int, kvpress_python: str | None,
              log=print) -> dict[str, Any]:
    torch._dynamo.config.cache_size_limit = 64  # one graph per system and shape, all kept
    device = model.device
    rows = []
    for batch in batches:
        ids = torch.randint(10, model.config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(0)).to(device)
        for new_tokens in lengths:
            for budget in budgets:  # full-cache systems run beside each budget: ratios stay within a repeat
                with momentkv.patched(model, budget=budget):
                    for system in systems:  # warm-up: compile every graph at its real shape
                        if "compiled" in system or "cudagraphs" in system:
                            run_system(system, model, ids, new_tokens, budget, kvpress_python, model_folder, False)
                    samples: dict[tuple, list[dict]] = {(s, budget): [] for s in systems}
                    for repeat in range(repeats):
                        for system in systems:
                            result = run_system(system, model, ids, new_tokens, budget, kvpress_python,
                                                model_folder)
                            samples[(system, budget)].append(result)
                            log(f"batch {batch} new {new_tokens} budget {budget} repeat {repeat} {system}: "
                                + (result.get("error") or f"{result['tokens_per_second']:.1f} tok/s"))
                rows.extend(_summarise(samples, batch, prompt_len, new_tokens, budget))
    result = dict(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                  threads=torch.get_num_threads(), dtype=str(model.dtype), model=model.config.model_type,
                  prompt_len=prompt_len, repeats=repeats, versions=versions(), rows=rows)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        result.update(world_size=torch.distributed.get_world_size(), per_rank=_per_rank_memory(rows))
    return result


MEMORY = ("kv_bytes", "cache_bytes", "rss_growth_bytes", "cuda_peak_allocated_bytes")


def _per_rank_memory(rows: list[dict]) -> list[list[dict]]:
    """Each rank's memory per row (tensor parallelism: every rank holds its share of the heads)."""
    mine = [{key: row[key] for key in ("system", "budget", "batch", "new_tokens", *MEMORY) if key in row}
            for row in rows]
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def _summarise(samples: dict, batch: int, prompt_len: int, new_tokens: int, budget: int) -> list[dict]:
    """Rows of one (batch, length, budget) block; full-cache rows carry the budget they ran beside."""
    rows = []
    reference = samples.get(("full-static-compiled", budget))
    for (system, _), runs in samples.items():
        ok = [r for r in runs if "error" not in r]
        row = dict(system=system, budget=budget, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
        if not ok:
            row["error"] = runs[0].get("error")
            rows.append(row)
            continue
        for key in ("tokens_per_second", "step_ms_median", "kv_bytes", "cache_bytes", "rss_growth_bytes",
                    "cuda_peak_allocated_bytes"):
            values = [r[key] for r in ok if key in r]
            if values:
                row[key] = median(values)
        if reference and all("error" not in r for r in reference) and system != "full-static-compiled":
            ratios = [r["tokens_per_second"] / ref["tokens_per_second"] for r, ref in zip(runs, reference)
                      if "error" not in r]
            row["speed_vs_static_compiled"] = median(ratios)
        rows.append(row)
    for row in rows:  # momentkv against kvpress at the same budget, within each repeat
        if row["system"].startswith("momentkv") and "tokens_per_second" in row:
            for interval in ("kvpress-i1", "kvpress-i16"):
                other = samples.get((interval, row["budget"]))
                mine = samples[(row["system"], row["budget"])]
                if other and all("error" not in r for r in other):
                    row[f"speed_vs_{interval}"] = median(a["tokens_per_second"] / b["tokens_per_second"]
                                                         for a, b in zip(mine, other))
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['device']} ({result['threads']} threads) {result['model']} {result['dtype']}, prompt "
             f"{result['prompt_len']}, median of {result['repeats']}",
             f"{'system':22s} {'budget':>6s} {'batch':>5s} {'new':>6s} {'tok/s':>8s} {'step ms':>8s} "
             f"{'KV MiB':>8s} {'x static':>8s} {'x kvp-i1':>8s} {'x kvp-i16':>9s}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['system']:22s} {str(r['budget']):>6s} {r['batch']:5d} {r['new_tokens']:6d}  {r['error']}")
            continue
        lines.append(
            f"{r['system']:22s} {'-' if r['system'].startswith('full') else str(r['budget']):>6s} {r['batch']:5d} {r['new_tokens']:6d} "
            f"{r['tokens_per_second']:8.1f} {r['step_ms_median']:8.2f} {r['kv_bytes'] / 2**20:8.2f} "
            f"{r.get('speed_vs_static_compiled', float('nan')):8.2f} {r.get('speed_vs_kvpress-i1', float('nan')):8.2f} "
            f"{r.get('speed_vs_kvpress-i16', float('nan')):9.2f}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if "tokens_per_second" in r and r["batch"] == min(x["batch"] for x in result["rows"]):
            full = r["system"].startswith("full")
            if full and r["budget"] != min(x["budget"] for x in result["rows"]):
                continue  # full-cache systems ran beside every budget: plot them once
            label = r["system"] + ("" if full else f" B={r['budget']}")
            series.setdefault(label, []).append((r["new_tokens"], r["tokens_per_second"]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result['model']} on {result['device']}, prompt {result['prompt_len']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
