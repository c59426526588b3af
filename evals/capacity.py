"""Throughput at a KV memory cap: what a fixed-size cache buys a server is more sequences in flight on the same memory.

For each cap (the memory set aside for keys and values), each system runs the largest batch whose cache fits it:
one sequence's cache is measured (a full cache's at its longest, prompt plus every generated token; momentkv's,
fixed), and the batch is the cap over it. The batch is a serving mix: prompts of mixed lengths (half to all of
``prompt_len`` tokens, left-padded), sampled (temperature 0.7, top-p 0.95). Reported per row: the batch, the
cache it holds, aggregate generated tokens per second, time per step (median and 99th percentile) and the
process's peak resident memory while the row ran (weights included; what earlier rows freed handed back first).
kvpress's decoding press (``kvpress-i1``, ``kvpress-i16``: StreamingLLM compressing back to the prompt and the
budget every 1 or 16 steps) runs in its own environment and process, one sequence at a time: it keeps no padding
mask through compression, so a serving mix cannot be batched; its row says how many would fit.
``momentkv bench --kv-caps ...`` runs it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from transformers import StaticCache, StoppingCriteriaList

import momentkv
from momentkv.evals.fidelity import SAMPLING
from momentkv.patching import GENERATE_CACHE_ARG

from .bench import _compile_config, compile_mode, kvpress_interval, run_system
from .provenance import versions
from .step_timer import StepTimer, held_bytes

SYSTEMS = ("full-dynamic", "full-static-compiled", "momentkv-eager", "momentkv-compiled", "momentkv-cudagraphs",
           "kvpress-i1", "kvpress-i16")
BUDGETED = ("momentkv", "kvpress")  # systems run at every budget
MiB = 2**20


def mixed_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of ``prompt_len // 2`` to ``prompt_len`` tokens, left-padded to ``prompt_len``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=generator)
    ids = torch.randint(10, vocab, (batch, prompt_len), generator=generator)
    mask = (torch.arange(prompt_len)[None] >= prompt_len - lengths[:, None]).long()
    return ids * mask, mask


def _generate(system: str, model, ids, mask, new_tokens: int, timer: StepTimer | None = None,
              cache_len: int | None = None, compiled: bool = True, **sampling):
    """One generation by ``system`` (momentkv's when the model is patched); returns the cache it held. A static
    cache holds ``cache_len`` tokens (default: the prompt and ``new_tokens``); ``compiled=False`` runs a compiled
    system eagerly (to measure its cache, not its speed)."""
    criteria = StoppingCriteriaList([timer] if timer else [])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=0, stopping_criteria=criteria, return_dict_in_generate=True, **sampling)
    mode = compile_mode(system, ids.device)
    compile_options = {"compile_config": _compile_config(mode)} if compiled and mode else {"disable_compile": True}
    if system.startswith("momentkv"):
        model.generate(**kwargs, **compile_options)
        return momentkv.state_of(model).cache
    generate = type(model).generate.__get__(model)  # transformers' own, past momentkv's
    if system == "full-static-compiled":
        cache = StaticCache(config=model.config, max_cache_len=cache_len or ids.shape[1] + new_tokens)
        generate(**kwargs, **{GENERATE_CACHE_ARG: cache}, **compile_options)
        return cache
    return getattr(generate(**kwargs, **compile_options), GENERATE_CACHE_ARG)


def sequence_bytes(system: str, model, prompt_len: int, new_tokens: int, budget: int | None = None) -> int:
    """One sequence's cache at its largest, measured, every layer counted (``held_bytes``): a dynamic cache grows by
    the same bytes per token once its sliding layers are full, so two short generations after a prompt at least a
    window long give it at ``prompt_len + new_tokens`` tokens; a static cache and momentkv's are allocated whole;
    kvpress's decoding press holds the prompt, ``budget`` and its interval's tokens before it compresses."""
    if system.startswith("kvpress"):  # a dynamic cache compressed back to prompt + budget every interval steps
        return sequence_bytes("full-dynamic", model, prompt_len, budget + kvpress_interval(system) + 1)
    ids, mask = mixed_prompts(1, prompt_len, model.config.vocab_size)
    mask = torch.ones_like(mask)
    if system != "full-dynamic":
        return held_bytes(_generate(system, model, ids, mask, 2, cache_len=prompt_len + new_tokens, compiled=False,
                                    do_sample=False))
    text = model.config.get_text_config(decoder=True)
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or ())
    window = getattr(text, "sliding_window", None) if sliding else None
    if window and window > prompt_len:  # its sliding layers would still grow between the two, then stop
        raise ValueError(f"prompt_len must be at least the model's sliding window ({window}) to size its dynamic cache, "
                         f"got {prompt_len}")
    short, long = (held_bytes(_generate(system, model, ids, mask, n, do_sample=False)) for n in (2, 10))
    return short + (long - short) // 8 * (new_tokens - 2)


def run_row(system: str, model, batch: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    ids, mask = mixed_prompts(batch, prompt_len, model.config.vocab_size)
    # compile what the row compiles (the decode step, the fused CPU kernels) at its shapes before timing it
    _generate(system, model, ids, mask, 4, cache_len=prompt_len + new_tokens, **SAMPLING)
    timer = StepTimer(ids.device)
    torch.manual_seed(0)
    cache = _generate(system, model, ids, mask, new_tokens, timer, **SAMPLING)
    return dict(_measured(timer.summary(batch)), batch=batch, cache_bytes=held_bytes(cache))


def _measured(summary: dict) -> dict:
    return {key: summary[key] for key in ("tokens_per_second", "step_ms_median", "step_ms_p99", "rss_peak_bytes")}


def run_kvpress_row(system: str, model, prompt_len: int, new_tokens: int, budget: int, kvpress_python: str | None,
                    model_folder: str | None) -> dict[str, Any]:
    """kvpress's decoding press on one sequence of ``prompt_len`` tokens, sampled, in its own process (its peak
    resident memory is that process's)."""
    ids = torch.zeros(1, prompt_len, dtype=torch.long, device=model.device)
    out = run_system(system, model, ids, new_tokens, budget, kvpress_python, model_folder, sampling=SAMPLING)
    if "error" in out:
        raise RuntimeError(f"{system}: {out['error']}")
    return dict(_measured(out), batch=1, cache_bytes=out["kv_bytes"])


def run_capacity(model, caps: list[int], prompt_len: int, new_tokens: int, budgets: list[int], systems: list[str],
                 max_batch: int, log=print, save=lambda result: None, kvpress_python: str | None = None,
                 model_folder: str | None = None) -> dict[str, Any]:
    """Every system at every cap (bytes), momentkv and kvpress at every budget; rows in the order run. ``save`` is
    given the result after every row (a long run stopped early keeps what it measured). kvpress's rows need
    ``kvpress_python`` and the model's ``model_folder``."""
    if any(s.startswith("kvpress") for s in systems):
        text = model.config.get_text_config(decoder=True)
        if set(getattr(text, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
            raise ValueError("systems: kvpress's rows at a cap are sized for models whose layers all attend in full; "
                             f"{model.config.model_type} has {sorted(set(text.layer_types))}")
    found = versions()  # before measuring: the code that runs is the code recorded
    rows: list[dict] = []
    result = dict(model=model.config.model_type, dtype=str(model.dtype), threads=torch.get_num_threads(),
                  prompt_len=prompt_len, new_tokens=new_tokens, max_batch=max_batch, versions=found, rows=rows)
    runs = [(s, None) for s in systems if not s.startswith(BUDGETED)]
    runs += [(s, b) for b in budgets for s in systems if s.startswith(BUDGETED)]
    for system, budget in runs:
        with momentkv.patched(model, budget=budget) if system.startswith("momentkv") else nullcontext():
            per_sequence = sequence_bytes(system, model, prompt_len, new_tokens, budget)
            for cap in caps:
                fits = cap // per_sequence
                one_at_a_time = system.startswith("kvpress")
                row = dict(system=system, budget=budget, cap_bytes=cap, sequence_bytes=per_sequence, fits=fits,
                           batch_capped=fits > (1 if one_at_a_time else max_batch), one_at_a_time=one_at_a_time)
                if fits and one_at_a_time:
                    row.update(run_kvpress_row(system, model, prompt_len, new_tokens, budget, kvpress_python,
                                               model_folder))
                elif fits:
                    row.update(run_row(system, model, min(fits, max_batch), prompt_len, new_tokens))
                rows.append(row)
                log(format_row(row))
                save(result)
    return result


def system_label(row: dict) -> str:
    """A row's system as the table and the plot name it: "momentkv-eager, budget 64", "full-dynamic"."""
    return row["system"] + (f", budget {row['budget']}" if row["budget"] else "")


def format_row(row: dict) -> str:
    head = f"{row['cap_bytes'] / MiB:,.0f} MiB | {system_label(row)} | {row['sequence_bytes'] / MiB:.1f} MiB"
    if not row["fits"]:
        return f"| {head} | no sequence fits | | | | |"
    batch = f"{row['batch']}" + (f" (of {row['fits']})" if row["batch_capped"] else "")
    if row.get("one_at_a_time"):
        batch += ", one at a time"
    return (f"| {head} | {batch} | {row['cache_bytes'] / MiB:,.0f} MiB | {row['tokens_per_second']:.1f} | "
            f"{row['step_ms_median']:.0f} / {row['step_ms_p99']:.0f} | {row['rss_peak_bytes'] / MiB:,.0f} MiB |")


def format_table(result: dict) -> str:
    lines = ["| KV cap | system | one sequence | batch | cache | tokens/s (all rows) | step ms median / p99 | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [format_row(row) for row in result["rows"]])


def plot(result: dict, path: str) -> list[str]:
    """Aggregate tokens/s against the KV cap, one line per system (momentkv per budget), each point labelled with its
    batch; returns the lines' labels, taken from the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[dict]] = {}
    for row in result["rows"]:
        if row["fits"]:
            lines.setdefault(system_label(row), []).append(row)
    for label, rows in lines.items():
        caps = [row["cap_bytes"] / MiB for row in rows]
        ax.plot(caps, [row["tokens_per_second"] for row in rows], marker="o", label=label)
        for cap, row in zip(caps, rows):
            ax.annotate(f"{row['batch']}", (cap, row["tokens_per_second"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV memory cap (MiB); each point's batch beside it")
    ax.set_ylabel("generated tokens/s, all rows")
    ax.set_title(f"{result['model']} {result['dtype']}, {result['new_tokens']} tokens, {result['threads']} threads, "
                 f"commit {result['versions'].get('commit', '?')[:7]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return list(lines)
