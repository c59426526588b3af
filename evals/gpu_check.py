"""``bash scripts/gpu-check``: everything that needs a CUDA GPU, staged to fit a 15-minute device lease.

Stages run most informative first, each within its share of the time budget (``--budget``, default 480 s;
``--quick`` 240 s); a stage's share is its weight over the weights of the stages still to run, so time one
stage leaves goes to the next. Each stage writes ``<out>/<stage>.json`` the moment it ends (with the device,
versions and commit); a failing stage does not stop the next; a summary prints at the end and is written to
``<out>/summary.json``. Stages with variable work (the benchmarks, the long run) do what fits in their share
and list what they skipped. ``--device cpu --tiny`` runs every stage end to end at toy shapes (the CI smoke).

Stages: environment -> Triton kernels against the reference (fp16/bf16, GQA groups 1/4/8, head dims
64/128/256, eviction over and under budget) -> CUDA-graph capture of the compiled decode step (no recompiles
over 200 steps, tokens equal to eager) -> kernel benchmark at Llama-3.1-8B head shapes -> end-to-end decoding
of Llama-3.1-8B-shaped random bf16 weights (full static cache compiled vs momentkv with CUDA graphs,
interleaved, median of 3) -> the long run (as many tokens as the remaining time allows, finite, flat memory).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch

from momentkv.cli import HelpFormatter

from .provenance import versions


@dataclass(frozen=True)
class Sizes:
    """What each stage runs."""

    budget_s: float  # the whole run
    dtypes: tuple[str, ...]  # kernels: input dtypes
    groups: tuple[int, ...]  # kernels: query heads per KV head
    head_dims: tuple[int, ...]  # kernels
    kernel_slots: int  # kernels: slots per head
    graph_steps: int  # cuda-graphs: decode steps compiled and compared with eager
    bench_keys: tuple[int, ...]  # kernel-bench: keys per head
    bench_batches: tuple[int, ...]
    e2e_model: str  # end-to-end: "llama-3.1-8b-random" or "tiny"
    e2e_prompt: int
    e2e_budgets: tuple[int, ...]
    e2e_lengths: tuple[int, ...]  # generated tokens, in the order tried
    e2e_batches: tuple[int, ...]
    e2e_repeats: int
    cap_bytes: int  # capacity: the KV memory cap
    cap_prompt: int
    cap_budgets: tuple[int, ...]
    cap_tokens: tuple[int, ...]  # capacity: generated tokens, in the order tried
    cap_max_batch: int
    long_dtypes: tuple[str, ...]
    long_budget: int
    long_max_tokens: int


GPU = Sizes(budget_s=480, dtypes=("float16", "bfloat16"), groups=(1, 4, 8), head_dims=(64, 128, 256),
            kernel_slots=1100, graph_steps=200, bench_keys=(1024, 4096, 16384, 32768), bench_batches=(1, 8),
            e2e_model="llama-3.1-8b-random", e2e_prompt=1024, e2e_budgets=(1024, 256), e2e_lengths=(1024, 4096, 16384),
            e2e_batches=(1, 8), e2e_repeats=3, cap_bytes=16 << 30, cap_prompt=1024, cap_budgets=(1024,),
            cap_tokens=(1024, 8192), cap_max_batch=128, long_dtypes=("float16", "bfloat16"), long_budget=256,
            long_max_tokens=100_000)
QUICK = replace(GPU, budget_s=240, groups=(1, 8), head_dims=(128, 256), bench_keys=(4096, 32768), bench_batches=(1,),
                e2e_lengths=(1024, 4096), e2e_batches=(1,), cap_tokens=(1024,))
TINY = Sizes(budget_s=300, dtypes=("float32",), groups=(1, 2), head_dims=(16,), kernel_slots=40, graph_steps=20,
             bench_keys=(64, 128), bench_batches=(1,), e2e_model="tiny", e2e_prompt=16, e2e_budgets=(8,),
             e2e_lengths=(24, 48), e2e_batches=(1, 2), e2e_repeats=2, cap_bytes=1 << 20, cap_prompt=16,
             cap_budgets=(8,), cap_tokens=(24, 48), cap_max_batch=8, long_dtypes=("float32",), long_budget=8,
             long_max_tokens=400)

# Each stage's weight in the time budget (see the module docstring).
WEIGHTS = {"environment": 1, "kernels": 20, "cuda-graphs": 15, "kernel-bench": 10, "end-to-end": 30, "capacity": 25,
           "long-run": 10}


@dataclass
class Context:
    sizes: Sizes
    device: torch.device
    out: Path
    header: dict[str, Any]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


# -- stages ------------------------------------------------------------------------------------------------
def environment(ctx: Context, until: float) -> dict[str, Any]:
    """Device, driver, versions and commit (also the header of every other stage's file)."""
    result = dict(ctx.header)
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        result.update(capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                      multiprocessors=props.multi_processor_count)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
            result["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            result["nvidia_smi"] = f"unavailable: {error}"
    from momentkv.ops.kernels import registered

    result["kernels"] = [f"{name}:{device}" for name, device in registered()]
    return result


def _random_state(batch: int, heads: int, slots: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A layer half-way through a generation: some slots invalid, some evicted tokens in the moments."""
    from momentkv.ops import LayerState

    gen = torch.Generator(device=device).manual_seed(seed)
    state = LayerState.allocate(batch, heads, slots, dim, dim, dtype, dtype, device)
    state.keys.copy_(torch.randn(state.keys.shape, generator=gen, device=device))
    state.values.copy_(torch.randn(state.values.shape, generator=gen, device=device))
    state.valid.copy_(torch.rand(state.valid.shape, generator=gen, device=device) < 0.9)
    state.evictable.copy_(torch.rand(state.valid.shape, generator=gen, device=device) < 0.8)
    state.importance.copy_(torch.rand(state.importance.shape, generator=gen, device=device))
    state.normalizer.copy_(torch.rand(state.normalizer.shape, generator=gen, device=device) + 1)
    state.positions.copy_(torch.randperm(slots, generator=gen, device=device).expand(batch, heads, slots))
    state.n.fill_(20.0)
    state.mu_k.copy_(0.1 * torch.randn(state.mu_k.shape, generator=gen, device=device))
    state.mu_v.copy_(torch.randn(state.mu_v.shape, generator=gen, device=device))
    state.comoment.copy_(torch.randn(state.comoment.shape, generator=gen, device=device))
    state.value_range.copy_(torch.tensor([-3.0, 3.0], device=device).view(1, 1, 2, 1))
    state.seen.fill_(slots + 7)
    return state, gen


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def kernels(ctx: Context, until: float) -> dict[str, Any]:
    """Each op's device kernel against the plain-PyTorch reference on the same inputs."""
    from momentkv.ops import NORMALIZED, StepSettings, call, prefill_scores
    from momentkv.ops.prefill import prefill_scores_reference

    sizes, device = ctx.sizes, ctx.device
    rows, skipped = [], []
    for dtype_name, group, dim in itertools.product(sizes.dtypes, sizes.groups, sizes.head_dims):
        case = dict(dtype=dtype_name, group=group, head_dim=dim)
        if time.perf_counter() > until:
            skipped.append(case)
            continue
        dtype = getattr(torch, dtype_name)
        state, gen = _random_state(2, 2, sizes.kernel_slots, dim, dtype, device, seed=group * 1000 + dim)
        query = torch.randn(2, 2 * group, dim, generator=gen, device=device).to(dtype)
        scale = dim ** -0.5
        budget = sizes.kernel_slots // 2
        settings = StepSettings(alpha=0.9, moments=True, moment_weight=0.0, budget=budget, score_kind=NORMALIZED,
                                recent_window=8, cap_window=False, layer_scope=False, seed=0)
        mine, ref = state.clone(), state.clone()
        out = call("decode_attention", mine, settings, query=query, scale=scale)
        expected = call("decode_attention", ref, settings, query=query, scale=scale, route="reference")
        row = dict(case, attention_rel_error=_rel(out, expected), finite=bool(torch.isfinite(out).all()),
                   importance_max_error=(mine.importance - ref.importance).abs().max().item())
        for over in (False, True):  # under the budget a masked no-op; over it, one victim per head
            mine, ref = state.clone(), state.clone()
            for each in (mine, ref):
                each.decode_len.fill_(budget + 1 if over else budget)
            call("evict", mine, settings)
            call("evict", ref, settings, route="reference")
            key = "evict_over_budget" if over else "evict_under_budget"
            row[f"{key}_same_victims"] = bool(torch.equal(mine.valid, ref.valid)
                                              and torch.equal(mine.free_slot, ref.free_slot))
            row[f"{key}_moments_rel_error"] = max(_rel(getattr(mine, name), getattr(ref, name))
                                                  for name in ("mu_k", "mu_v", "comoment"))
        # The whole step (write, attention and eviction) over the budget, as decoding calls it.
        mine, ref = state.clone(), state.clone()
        token = torch.randn(2, 2, 1, dim, generator=gen, device=device).to(dtype)
        for each in (mine, ref):
            each.decode_len.fill_(budget + 1)
        out = call("decode_step", mine, settings, query=query, key=token, value=token, scale=scale)
        expected = call("decode_step", ref, settings, query=query, key=token, value=token, scale=scale,
                        route="reference")
        row["step_rel_error"] = _rel(out, expected)
        row["step_same_victims"] = bool(torch.equal(mine.valid, ref.valid) and torch.equal(mine.free_slot, ref.free_slot))
        prompt = torch.randn(2, 2 * group, 16, dim, generator=gen, device=device).to(dtype)
        valid = torch.ones(2, sizes.kernel_slots, dtype=torch.bool, device=device)
        got = prefill_scores(prompt, state.keys, valid, scale, 0.9)
        want = prefill_scores_reference(prompt, state.keys, valid, scale, 0.9)
        row["prefill_rel_error"] = max(_rel(a, b) for a, b in zip(got, want))
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        row["passed"] = (row["finite"] and row["attention_rel_error"] < tolerance
                         and row["importance_max_error"] < tolerance and row["prefill_rel_error"] < tolerance
                         and row["evict_over_budget_same_victims"] and row["evict_under_budget_same_victims"]
                         and row["evict_over_budget_moments_rel_error"] < 1e-4
                         and row["step_rel_error"] < tolerance and row["step_same_victims"])
        rows.append(row)
    failed = [r for r in rows if not r["passed"]]
    return dict(rows=rows, skipped=skipped, passed=not failed,
                failed_cases=[{k: r[k] for k in ("dtype", "group", "head_dim")} for r in failed])


GRAPH_POLICIES = ("momentum", "keydiff")  # a rule on the fused kernels, and one on the generic path


def cuda_graphs(ctx: Context, until: float) -> dict[str, Any]:
    """The compiled decode step (CUDA graphs on CUDA): one graph, no recompiles, tokens equal to eager, for a
    rule on the fused kernels and a registered rule on the generic path (its function traced into the step)."""
    from .long_run import random_llama

    steps = ctx.sizes.graph_steps
    model = random_llama(torch.float32, ctx.device.type, max_positions=steps + 256)
    rows, skipped = {}, []
    for policy in GRAPH_POLICIES:
        if rows and time.perf_counter() > until:
            skipped.append(policy)
            continue
        rows[policy] = _graph_check(ctx, model, policy, steps)
    return dict(policies=rows, skipped=skipped, passed=all(row["passed"] for row in rows.values()))


def _graph_check(ctx: Context, model, policy: str, steps: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    import momentkv

    ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    kwargs = dict(input_ids=ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    budget = max(8, steps // 8)  # evicting from an eighth of the way on
    recordings = []
    if ctx.device.type == "cuda":
        from torch._inductor import cudagraph_trees

        record = cudagraph_trees.CUDAGraphTreeManager.record_function

        def counting(self, *args, **kwargs):
            recordings.append(1)
            return record(self, *args, **kwargs)

        cudagraph_trees.CUDAGraphTreeManager.record_function = counting
    try:
        with momentkv.patched(model, budget=budget, policy=policy, compile=False):
            eager = model.generate(**kwargs)
        torch._dynamo.reset()
        counters.clear()
        started = time.perf_counter()
        with momentkv.patched(model, budget=budget, policy=policy, compile=True):
            compiled = model.generate(**kwargs)
            first_seconds = time.perf_counter() - started
            again = model.generate(**kwargs)  # a new generation of the same shape: nothing may recompile
    finally:
        if ctx.device.type == "cuda":
            cudagraph_trees.CUDAGraphTreeManager.record_function = record
    result = dict(steps=steps, budget=budget, unique_graphs=counters["stats"]["unique_graphs"],
                  graph_breaks=sum(counters["graph_break"].values()),
                  recompiles=sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
                  tokens_equal_eager=bool(torch.equal(compiled, eager)), second_run_equal=bool(torch.equal(again, eager)),
                  first_generation_seconds=first_seconds)
    if ctx.device.type == "cuda":
        result.update(cudagraph_recordings=len(recordings), cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    result["passed"] = (result["unique_graphs"] == 1 and result["graph_breaks"] == 0 and result["tokens_equal_eager"]
                        and result["second_run_equal"] and result.get("cudagraph_skips", 0) == 0
                        and result.get("cudagraph_recordings", 1) == 1)
    return result


def kernel_bench(ctx: Context, until: float) -> dict[str, Any]:
    """Decode attention against SDPA at Llama-3.1-8B head shapes, bandwidth, eviction's cost."""
    from .kernel_bench import run_kernel_bench

    return run_kernel_bench(list(ctx.sizes.bench_keys), list(ctx.sizes.bench_batches), ctx.device.type,
                            deadline=until)


def end_to_end(ctx: Context, until: float) -> dict[str, Any]:
    """The full static cache compiled against momentkv compiled (CUDA graphs on CUDA), interleaved, per
    (generated length, batch) block in the order given, as many blocks as fit; ratios within each repeat."""
    import momentkv

    from .bench import run_system
    from .long_run import random_llama
    from .models import bench_model

    sizes, device = ctx.sizes, ctx.device
    if sizes.e2e_model == "tiny":
        model = random_llama(torch.float32, device.type, max_positions=sizes.e2e_prompt + max(sizes.e2e_lengths) + 64)
    else:
        model, _ = bench_model(sizes.e2e_model, device.type)
    torch._dynamo.config.cache_size_limit = 64  # one graph per system and shape, all kept
    full, mine = "full-static-compiled", "momentkv-cudagraphs" if device.type == "cuda" else "momentkv-compiled"
    systems = {full: 0, **{f"{mine} budget {budget}": budget for budget in sizes.e2e_budgets}}
    blocks, skipped = [], []
    step_s: dict[int, float] = {}  # batch -> the slowest step measured at that batch (seconds)
    warmup_s = 0.0  # the longest warm-up (compilation) of a block so far
    for new_tokens, batch in itertools.product(sizes.e2e_lengths, sizes.e2e_batches):
        block = dict(new_tokens=new_tokens, batch=batch)
        step = step_s.get(batch, max(step_s.values(), default=0.0))
        estimate = warmup_s + len(systems) * sizes.e2e_repeats * new_tokens * step
        if blocks and time.perf_counter() + estimate > until:
            skipped.append(dict(block, estimated_seconds=round(estimate, 1)))
            continue
        ids = torch.randint(10, model.config.vocab_size, (batch, sizes.e2e_prompt),
                            generator=torch.Generator().manual_seed(0)).to(device)

        def run(name: str, timed: bool = True) -> dict[str, Any]:
            budget = systems[name]
            system = full if name == full else mine
            if not budget:
                return run_system(system, model, ids, new_tokens, budget, None, "", timed, deadline=until)
            with momentkv.patched(model, budget=budget):
                return run_system(system, model, ids, new_tokens, budget, None, "", timed, deadline=until)

        started = time.perf_counter()
        for name in systems:  # warm-up: compile every graph at its real shape
            run(name, timed=False)
        warmup_s = max(warmup_s, time.perf_counter() - started)
        samples: dict[str, list[dict]] = {name: [] for name in systems}
        stopped = False
        for _ in range(sizes.e2e_repeats):  # interleaved: every system once per repeat
            for name in systems:
                result = run(name)
                if result["decode_steps"] < new_tokens - 1:  # the deadline stopped it: keep the repeats done
                    stopped = True
                    break
                samples[name].append(result)
            if stopped:
                break
        done = min(len(each) for each in samples.values())
        if done:
            rows = {}
            for name, each in samples.items():
                each = each[:done]
                rows[name] = {key: median(r[key] for r in each) for key in ("tokens_per_second", "step_ms_median")}
                rows[name].update({key: each[0][key] for key in ("kv_bytes", "cuda_peak_allocated_bytes")
                                   if key in each[0]})
                if name != full:
                    rows[name]["speed_vs_full_static_compiled"] = median(
                        r["tokens_per_second"] / f["tokens_per_second"] for r, f in zip(each, samples[full]))
            step_s[batch] = max(row["step_ms_median"] for row in rows.values()) / 1e3
            blocks.append(dict(block, prompt=sizes.e2e_prompt, repeats=done, systems=rows))
        if stopped:
            skipped.append(dict(block, stopped_by_deadline_after_repeats=done))
            break
    return dict(model=sizes.e2e_model, dtype=str(model.dtype), blocks=blocks, skipped=skipped)


def capacity_stage(ctx: Context, until: float) -> dict[str, Any]:
    """Throughput at a KV memory cap (issue 39): each system at the largest batch whose cache fits the cap, the full
    static cache compiled (CUDA graphs on CUDA) against momentkv with CUDA graphs at each budget, Llama-3.1-8B's
    shapes in bf16 (random weights). Generated lengths in the order given, each tried only if the last one's time
    scaled by the tokens fits what is left; what did not fit is listed."""
    from .capacity import run_capacity
    from .long_run import random_llama
    from .models import bench_model

    sizes, device = ctx.sizes, ctx.device
    if sizes.e2e_model == "tiny":
        model = random_llama(torch.float32, device.type, max_positions=sizes.cap_prompt + max(sizes.cap_tokens) + 64)
    else:
        model, _ = bench_model(sizes.e2e_model, device.type)
    mine = "momentkv-cudagraphs" if device.type == "cuda" else "momentkv-compiled"
    runs, skipped, last = [], [], None  # last: (tokens, seconds) of the previous length
    for tokens in sizes.cap_tokens:
        estimate = last[1] * tokens / last[0] if last else 0.0
        if last and time.perf_counter() + estimate > until:
            skipped.append(dict(new_tokens=tokens, estimated_seconds=round(estimate, 1)))
            continue
        started = time.perf_counter()
        result = run_capacity(model, [sizes.cap_bytes], sizes.cap_prompt, tokens, list(sizes.cap_budgets),
                              ["full-static-compiled", mine], sizes.cap_max_batch, log=lambda line: None)
        last = (tokens, time.perf_counter() - started)
        full = next(r for r in result["rows"] if r["system"] == "full-static-compiled")
        for row in result["rows"]:
            if row["system"] != "full-static-compiled" and row["fits"] and full["fits"]:
                row["throughput_vs_full"] = row["tokens_per_second"] / full["tokens_per_second"]
        runs.append(result)
    return dict(model=sizes.e2e_model, cap_bytes=sizes.cap_bytes, runs=runs, skipped=skipped)


def long_run_stage(ctx: Context, until: float) -> dict[str, Any]:
    """A long generation per dtype with a small budget, as long as the remaining time allows: every score and
    moment finite, memory flat after the warm-up."""
    from .long_run import long_run, summary

    sizes, runs = ctx.sizes, []
    probe = summary(long_run(64, torch.float32, ctx.device.type, sizes.long_budget, every=16))
    rate = probe["tokens_per_second"]
    for index, name in enumerate(sizes.long_dtypes):
        left = until - time.perf_counter()
        share = left / (len(sizes.long_dtypes) - index)
        tokens = int(min(sizes.long_max_tokens, max(64, 0.7 * share * rate)))
        result = summary(long_run(tokens, getattr(torch, name), ctx.device.type, sizes.long_budget,
                                  every=max(tokens // 20, 8)))
        result.pop("checkpoints")
        runs.append(result)
    flat = all(abs(r.get("cuda_growth_after_warmup_bytes", 0)) < 1 << 20 for r in runs)
    return dict(runs=runs, passed=all(r["finite"] for r in runs) and flat)


STAGES: dict[str, Callable[[Context, float], dict[str, Any]]] = {
    "environment": environment, "kernels": kernels, "cuda-graphs": cuda_graphs, "kernel-bench": kernel_bench,
    "end-to-end": end_to_end, "capacity": capacity_stage, "long-run": long_run_stage,
}


# -- the run -----------------------------------------------------------------------------------------------
def run(ctx: Context, stages: list[str]) -> list[dict[str, Any]]:
    """Every stage in order, each within its share of what is left; returns one record per stage."""
    deadline = time.perf_counter() + ctx.sizes.budget_s
    records = []
    for index, name in enumerate(stages):
        now = time.perf_counter()
        weight = WEIGHTS[name] / sum(WEIGHTS[s] for s in stages[index:])
        allotted = max(0.0, deadline - now) * weight
        record = dict(stage=name, allotted_seconds=round(allotted, 1), header=ctx.header)
        print(f"[gpu-check] {name}: up to {allotted:.0f} s", flush=True)
        try:
            record["result"] = STAGES[name](ctx, now + allotted)
            passed = record["result"].get("passed", True)
            record["status"] = "ok" if passed else "failed"
        except Exception as error:  # noqa: BLE001 - a failing stage is recorded and the next one runs
            record.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - now, 1)
        ctx.out.mkdir(parents=True, exist_ok=True)
        (ctx.out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
        print(f"[gpu-check] {name}: {record['status']} in {record['seconds']} s"
              + (f" ({record['error']})" if "error" in record else ""), flush=True)
        records.append(record)
    return records


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per stage, with its headline numbers."""
    lines = []
    for record in records:
        result = record.get("result", {})
        text = f"{record['stage']:13s} {record['status']:6s} {record['seconds']:7.1f} s / {record['allotted_seconds']:.0f} s"
        if record["stage"] == "kernels" and result:
            worst = max((r["attention_rel_error"] for r in result["rows"]), default=float("nan"))
            text += f"  {len(result['rows'])} cases, worst attention error {worst:.1e}, skipped {len(result['skipped'])}"
        elif record["stage"] == "cuda-graphs" and result:
            text += "".join(f"  {policy}: graphs {row['unique_graphs']}, breaks {row['graph_breaks']}, equal to eager "
                            f"{row['tokens_equal_eager']}" for policy, row in result["policies"].items())
        elif record["stage"] == "kernel-bench" and result:
            text += f"  {len(result['rows'])} rows, skipped {len(result.get('skipped', []))}"
        elif record["stage"] == "end-to-end" and result:
            for block in result["blocks"]:
                ratios = ", ".join(f"budget {name.split()[-1]} {row['speed_vs_full_static_compiled']:.2f}x"
                                   for name, row in block["systems"].items() if "speed_vs_full_static_compiled" in row)
                text += f"\n{'':16s}{block['new_tokens']} tokens, batch {block['batch']}: momentkv/full {ratios}"
            if result["skipped"]:
                text += f"\n{'':16s}skipped {len(result['skipped'])} blocks for time"
        elif record["stage"] == "capacity" and result:
            from .capacity import system_label

            for run in result["runs"]:
                rows = ", ".join(f"{system_label(row)}: batch {row.get('batch', 0)}, {row.get('tokens_per_second', 0):.0f} "
                                 "tokens/s" for row in run["rows"])
                text += f"\n{'':16s}{run['new_tokens']} tokens, cap {result['cap_bytes'] / 2**30:.3g} GiB: {rows}"
            if result["skipped"]:
                text += f"\n{'':16s}skipped {', '.join(str(s['new_tokens']) for s in result['skipped'])} tokens for time"
        elif record["stage"] == "long-run" and result:
            text += "  " + ", ".join(f"{r['dtype']} {r['tokens']} tokens finite={r['finite']}" for r in result["runs"])
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when available")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and lengths, 240 s in all")
    parser.add_argument("--tiny", action="store_true", help="toy shapes for a CPU smoke run of every stage")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: 480, "
                                                                     "--quick 240, --tiny 300)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in this order")
    parser.add_argument("--out", default=None, help="folder of the JSON files (default results/gpu-check/<device>)")
    parser.add_argument("--commit", default=None, help="the commit to record (default: $MOMENTKV_COMMIT, else "
                                                        "git rev-parse HEAD)")
    args = parser.parse_args(argv)
    from .models import default_device

    device = torch.device(default_device(args.device))
    sizes = TINY if args.tiny else QUICK if args.quick else GPU
    if args.budget is not None:
        sizes = replace(sizes, budget_s=args.budget)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; known: {', '.join(STAGES)}")
    name = _device_name(device)
    out = Path(args.out) if args.out else Path("results/gpu-check") / name.replace(" ", "-")
    found = versions()
    header = dict(device=name, device_type=device.type, versions=found, commit=args.commit or found["commit"],
                  sizes=asdict(sizes), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    records = run(Context(sizes, device, out, header), stages)
    lines = summary_lines(records)
    (out / "summary.json").write_text(json.dumps(dict(header=header, stages=[
        {k: r[k] for k in ("stage", "status", "seconds", "allotted_seconds")} for r in records], lines=lines), indent=2))
    print(f"\ngpu-check on {name} ({header['versions']['torch']}, triton {header['versions']['triton']}, "
          f"transformers {header['versions']['transformers']}, commit {header['commit'][:12]}):")
    print("\n".join(lines))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
