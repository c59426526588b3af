"""Markdown tables and plots from a results file of ``momentkv eval``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from momentkv.config import MomentKVConfig

from .methods import method
from .suite import Results

METRICS = {  # workload -> (metric, better, label)
    "sweep": (("top1", "max", "top-1 %"), ("kl", "min", "KL")),
    "long-generation": (("top1", "max", "top-1 %"), ("kl", "min", "KL"), ("rouge_l", "max", "ROUGE-L")),
    "long-prompt": (("top1", "max", "top-1 %"), ("kl", "min", "KL"), ("rouge_l", "max", "ROUGE-L")),
    "perplexity": (("perplexity", "min", "perplexity"),),
    "retrieval": (("accuracy", "max", "accuracy %"),),
}
METRICS.update({f"{name}-sampled": METRICS[name] for name in ("sweep", "long-generation")},
               **{"long-prompt-ratios": METRICS["long-prompt"]})


def _column(key: str) -> str:
    """The column a cell belongs to: everything after workload and method."""
    return "/".join(key.split("/")[2:])


def tables(results: Results) -> dict[str, tuple[list[str], list[str], dict]]:
    """workload -> (methods, columns, {(method, column): entry}); the full cache first, then methods in
    first-seen order."""
    out: dict[str, tuple[list[str], list[str], dict]] = {}
    for key, entry in results.data["cells"].items():
        workload, name = key.split("/")[:2]
        methods, columns, cells = out.setdefault(workload, ([], [], {}))
        column = _column(key)
        if name not in methods:
            methods.append(name)
        if column not in columns:
            columns.append(column)
        cells[(name, column)] = entry
    for methods, columns, _ in out.values():
        methods.sort(key=lambda m: m != "full")  # the reference row first, the rest as first seen
        columns.sort(key=lambda c: [int(p) if p.isdigit() else p for p in c.replace("x", "").split("/")])
    return out


def _format(metric: str, value: float) -> str:
    if metric in ("top1", "accuracy"):
        return f"{100 * value:.1f}"
    if metric == "rouge_l":
        return f"{value:.3f}"
    if metric == "perplexity":
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown(results: Results) -> str:
    lines = [f"# momentkv fidelity ({results.data.get('environment', {}).get('model', 'model')})", ""]
    settings = results.data.get("settings", {})
    for workload, (methods, columns, cells) in tables(results).items():
        lines += [f"## {workload}", ""]
        if workload == "retrieval":
            lines.append(f"Column: decode budget/task/context tokens/prefill compression; {settings.get('retrieval_samples')} samples each.")
        elif workload == "long-prompt-ratios":
            lines.append("Column: decode budget (the tokens generated: nothing evicted while answering)/kvpress's "
                         "compression ratio r: each prompt keeps int(its length x (1 - r)) tokens for every method, "
                         "kvpress's prefill presses run in kvpress 0.5.5's environment. Cache tokens per KV head in "
                         "parentheses.")
        else:
            lines.append("Column: decode budget (and prefill budget). Cache tokens per KV head in parentheses.")
        lines.append("Bold: best compressed method in the column.")
        lines.append("")
        for metric, better, label in METRICS[workload]:
            lines += [f"**{label}**", "", "| method | " + " | ".join(columns) + " |",
                      "|---|" + "---|" * len(columns)]
            best = {}
            for column in columns:
                values = [cells[(m, column)][metric] for m in methods
                          if m != "full" and (m, column) in cells and metric in cells[(m, column)]]
                if values:
                    best[column] = (max if better == "max" else min)(values)
            for name in methods:
                row = []
                for column in columns:
                    entry = cells.get((name, column))
                    if entry is None or metric not in entry:
                        row.append("—")
                        continue
                    text = _format(metric, entry[metric])
                    if name != "full" and entry[metric] == best.get(column):
                        text = f"**{text}**"
                    row.append(f"{text} ({entry['cache_tokens']:.0f})")
                lines.append(f"| {name} | " + " | ".join(row) + " |")
            if workload == "long-prompt-ratios":
                lines += against_best_press(methods, columns, cells, metric, better)
            lines.append("")
        if workload.removesuffix("-sampled") in ("sweep", "long-generation"):
            lines += per_prompt(workload, methods, columns, cells)
    return "\n".join(lines)


def is_default(name: str, budget: int) -> bool:
    """Whether method ``name`` runs momentkv's default configuration at ``budget``."""
    return name != "full" and not name.startswith("kvpress-") and method(name).config(budget) == MomentKVConfig(budget)


def against_best_press(methods: list[str], columns: list[str], cells: dict, metric: str, better: str) -> list[str]:
    """Two rows under a table at kvpress's ratios: the best kvpress press per column, and momentkv's default as a
    share of it (its value over the press's)."""
    presses = [m for m in methods if m.startswith("kvpress-")]
    pick = max if better == "max" else min
    best, share = [], []
    for column in columns:
        scored = [(cells[(m, column)][metric], m) for m in presses if metric in cells.get((m, column), {})]
        default = [cells[(m, column)][metric] for m in methods if (m, column) in cells and metric in cells[(m, column)]
                   and is_default(m, int(column.split("/")[0]))]
        if not scored:
            best.append("—"), share.append("—")
            continue
        value, name = pick(scored)
        best.append(f"{name} {_format(metric, value)}")
        share.append(f"{default[0] / value:.2f}x" if default and value else "—")
    return ["| best kvpress press | " + " | ".join(best) + " |",
            "| the default / best press | " + " | ".join(share) + " |"]


def per_prompt(workload: str, methods: list[str], columns: list[str], cells: dict) -> list[str]:
    """KL per prompt at each budget, with the period of the loop each full-cache reference falls into.

    A mean over 16 prompts can turn on one or two of them: a cache whose recent window spans a
    reference's loop copies it, one that does not cannot (``loop_period`` in evals/fidelity.py)."""
    lines = [f"### {workload}: KL per prompt", "",
             "Bold: lowest KL among compressed methods for the prompt; last column: prompts where the method is lowest.",
             ""]
    for column in columns:
        rows = {m: cells[(m, column)]["kl_rows"] for m in methods
                if m != "full" and "kl_rows" in cells.get((m, column), {})}
        if not rows:
            continue
        count = len(next(iter(rows.values())))
        best = [min(r[i] for r in rows.values()) for i in range(count)]
        loops = cells.get(("full", column), {}).get("loop_period_rows")
        lines += [f"**budget {column}**", "", "| method | " + " | ".join(map(str, range(count))) + " | lowest on |",
                  "|---|" + "---|" * (count + 1)]
        if loops:
            lines.append("| loop period (full) | " + " | ".join(map(str, loops)) + " | |")
        for name, values in rows.items():
            text = [f"**{v:.3f}**" if v == b else f"{v:.3f}" for v, b in zip(values, best)]
            lines.append(f"| {name} | " + " | ".join(text) + f" | {sum(v == b for v, b in zip(values, best))} |")
        lines.append("")
    return lines


def plot(results: Results, workload: str, metric: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, columns, cells = tables(results)[workload]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budget_columns = [c for c in columns if c.isdigit()]
    colors = plt.get_cmap("tab20").colors  # enough distinct colours for a sweep's many rules
    for i, name in enumerate(methods):
        points = [(int(c), cells[(name, c)][metric]) for c in budget_columns  # kvpress has no free run: no ROUGE-L
                  if metric in cells.get((name, c), {})]
        if name == "full" or len(points) < 1:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, [100 * y if metric == "top1" else y for y in ys], marker="os^D"[i % 4], label=name,
                color=colors[i % len(colors)], linewidth=2.5 if name in ("momentkv", "momentkv-open") else 1.2)
    ax.set_xscale("log", base=2)
    if metric in ("kl", "perplexity"):
        ax.set_yscale("log")  # spans orders of magnitude across budgets
    ax.set_xlabel("decode budget (slots per KV head)")
    ax.set_ylabel(label)
    ax.set_title(f"{workload}: {label} against budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The README's picture: momentkv's two modes against the best peers at equal memory, and the full cache. momentkv's
# labels are read off each method's configuration, so "(default)" follows the library's defaults.
MOMENTKV_MODES = ("momentkv-open", "momentkv")
PEERS = {"streamingllm+moments": "StreamingLLM + moment correction", "window+moments": "window + moment correction",
         "kvpress-tova": "kvpress TOVAPress (every step)"}


def momentkv_label(name: str, budget: int) -> str:
    """"momentkv, prompt kept" or "..., prompt tokens compete", and "(default)" where the method's configuration is
    the library's default (``prefill_carry`` aside: it acts only when a prefill budget compresses the prompt)."""
    config = method(name).config(budget)
    default = MomentKVConfig(budget=budget)
    mode = "prompt kept" if config.protect_prompt else "prompt tokens compete"
    is_default = dataclasses.replace(config, prefill_carry=default.prefill_carry) == default
    return f"momentkv, {mode}{' (default)' if is_default else ''}"


HEADLINE_WORKLOADS = {"long-generation": "greedy text", "long-generation-sampled": "sampled text"}  # the first run


def headline(results: Results, path: Path) -> bool:
    """Top-1 agreement and KL against cache size, long generation: each method's points at its budgets, the
    full cache at its own size; along greedy text, or along sampled text where greedy was not run (a base model's
    greedy text loops). Returns False (writes nothing) if the results lack both."""
    workload = next((w for w in HEADLINE_WORKLOADS if w in tables(results)), None)
    if workload is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, columns, cells = tables(results)[workload]
    full = [cells[("full", c)] for c in columns if ("full", c) in cells]
    budget = next(int(c) for c in columns if c.isdigit())
    legends = {**{name: momentkv_label(name, budget) for name in MOMENTKV_MODES}, **PEERS}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, label) in zip(axes, (("top1", "top-1 agreement with the full cache, %"),
                                          ("kl", "KL(full || compressed), log scale"))):
        for i, (name, legend) in enumerate(legends.items()):
            points = sorted((cells[(name, c)]["cache_tokens"], cells[(name, c)][metric]) for c in columns
                            if metric in cells.get((name, c), {}))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, [100 * y if metric == "top1" else y for y in ys], marker="os^Dv"[i], label=legend,
                        linewidth=2.5 if name.startswith("momentkv") else 1.2)
        if full:
            ax.axvline(full[0]["cache_tokens"], color="black", linestyle="--", linewidth=1)
            ax.annotate(f"full cache: {full[0]['cache_tokens']:.0f}", (full[0]["cache_tokens"], 0.5),
                        xycoords=("data", "axes fraction"), rotation=90, ha="right", va="center", fontsize=8)
        ax.set_xscale("log", base=2)
        if metric == "kl":
            ax.set_yscale("log")
        ax.set_xlabel("KV cache tokens per layer and head at the end (memory)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    settings = results.data.get("settings", {})
    fig.suptitle(f"{results.data.get('environment', {}).get('model', 'model')}: {settings.get('prompts')} prompts x "
                 f"{settings.get('new_tokens')} generated tokens, teacher-forced along the full cache's "
                 f"{HEADLINE_WORKLOADS[workload]}", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: Results) -> list[Path]:
    """``<out>.md`` beside the results file, one PNG per workload and metric with budget columns, and the
    headline picture."""
    written = [results.path.with_suffix(".md")]
    written[0].write_text(markdown(results))
    picture = results.path.with_name(f"{results.path.stem}-headline.png")
    if headline(results, picture):
        written.append(picture)
    for workload, (methods, columns, _) in tables(results).items():
        if workload == "retrieval" or not any(c.isdigit() for c in columns):
            continue
        for metric, _, label in METRICS[workload]:
            path = results.path.with_name(f"{results.path.stem}-{workload}-{metric}.png")
            plot(results, workload, metric, label, path)
            written.append(path)
    return written
