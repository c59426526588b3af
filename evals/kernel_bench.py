"""Kernel benchmark: momentkv's decode attention against SDPA on the same keys, and eviction's cost.

Llama-3.1-8B head shapes (32 query heads, 8 KV heads, head_dim 128), bf16, one query per sequence.
Bytes counted are the fewest any decode attention must move: K and V read once (the query and
output are negligible). Bandwidth is compared with the datasheet peak and with a device-to-device
copy measured in the same run. Each configuration is checked against the reference kernel first.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F

from momentkv.ops import NORMALIZED, LayerState, StepSettings, call
from momentkv.ops.kernels import Route

from .provenance import versions

DATASHEET_TBPS = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H200": 4.8, "H100 NVL": 3.9}
L2_ROTATION_BYTES = 256 * 2**20  # rotate input sets until this much is in play, so timings do not measure L2


def _timer(device: torch.device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    def cpu_time(fn) -> float:
        fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return median(samples)

    return cpu_time


def _copy_tbps(device: torch.device, timer) -> float | None:
    if device.type != "cuda":
        return None
    src = torch.randn(2**30 // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    micros = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (micros * 1e-6) / 1e12


def _inputs(batch: int, keys: int, dtype: torch.dtype, device: torch.device, hq=32, hkv=8, d=128):
    """Rotating input sets: (query, a full layer over ``keys`` slots with an evicted set), and K+V bytes."""

    def make() -> tuple[torch.Tensor, LayerState]:
        state = LayerState.allocate(batch, hkv, keys, d, d, dtype, dtype, device)
        state.keys.normal_()
        state.values.normal_()
        state.valid.fill_(True)
        state.evictable.fill_(True)
        state.importance.uniform_()
        state.normalizer.uniform_().add_(1)
        state.positions.copy_(torch.arange(keys, device=device))
        state.n.fill_(100.0)
        state.mu_k.normal_().mul_(0.1)
        state.mu_v.normal_()
        state.comoment.normal_()
        state.value_range.copy_(torch.tensor([-3.0, 3.0], device=device).view(1, 1, 2, 1))
        state.decode_len.fill_(keys)  # over a budget of keys - 1: every eviction call evicts
        state.seen.fill_(keys + 1)
        return torch.randn(batch, hq, d, dtype=dtype, device=device), state

    first = make()
    kv_bytes = 2 * first[1].keys.numel() * first[1].keys.element_size()
    copies = 1 if device.type != "cuda" else max(1, min(8, L2_ROTATION_BYTES // max(kv_bytes, 1)))
    return [first] + [make() for _ in range(copies - 1)], kv_bytes


def _rotating(sets: list, fn):
    state = {"i": 0}

    def run():
        fn(*sets[state["i"] % len(sets)])
        state["i"] += 1

    return run


def _settings(state: LayerState, moments: bool = True) -> StepSettings:
    return StepSettings(alpha=0.9, moments=moments, moment_weight=0.0, budget=state.keys.shape[2] - 1,
                        score_kind=NORMALIZED, recent_window=8, cap_window=False, layer_scope=False, seed=0)


def _attention(query: torch.Tensor, state: LayerState, corrected: bool = True, route: Route = "kernel"):
    return call("decode_attention", state, _settings(state, corrected), route=route, query=query, scale=0.088)


def _evict(query: torch.Tensor, state: LayerState) -> None:
    call("evict", state, _settings(state))


def _check(query: torch.Tensor, state: LayerState) -> float:
    """Relative error of the kernel against the fp32 reference on these inputs (poisoned output first)."""
    out = _attention(query, state.clone())
    ref = _attention(query, state.clone(), route="reference")
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_kernel_bench(keys_list: list[int], batches: list[int], device: str = "cuda",
                     dtype: torch.dtype = torch.bfloat16, deadline: float | None = None) -> dict[str, Any]:
    """Every (batch, keys) row, in that order; with a ``deadline`` (``time.perf_counter()``), rows not started
    by then are listed as skipped."""
    dev = torch.device(device)
    timer = _timer(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    datasheet = next((v for k, v in DATASHEET_TBPS.items() if k in name), None)
    copy_tbps = _copy_tbps(dev, timer)
    rows, skipped = [], []
    for batch in batches:
        for keys in keys_list:
            if deadline is not None and time.perf_counter() > deadline:
                skipped.append(dict(batch=batch, keys=keys))
                continue
            sets, kv_bytes = _inputs(batch, keys, dtype, dev)
            error = _check(*sets[0])
            row = dict(batch=batch, keys=keys, kv_bytes=kv_bytes, rel_error=error)
            row["momentkv_us"] = timer(_rotating(sets, _attention))
            row["momentkv_uncorrected_us"] = timer(_rotating(sets, lambda q, s: _attention(q, s, corrected=False)))
            backends = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"} if dev.type == "cuda" \
                else {"math": "MATH"}
            for label, backend in backends.items():
                def sdpa(query, s, backend=backend):
                    with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                        F.scaled_dot_product_attention(query[:, :, None], s.keys, s.values, scale=0.088,
                                                       enable_gqa=True)
                try:
                    row[f"sdpa_{label}_us"] = timer(_rotating(sets, sdpa))
                except RuntimeError as error:  # a backend that refuses these shapes
                    row[f"sdpa_{label}_us"] = None
                    row[f"sdpa_{label}_error"] = str(error).splitlines()[0][:200]
            evict_sets = [(query, state.clone()) for query, state in sets]
            row["evict_us"] = timer(_rotating(evict_sets, _evict))
            row["momentkv_tbps"] = kv_bytes / (row["momentkv_us"] * 1e-6) / 1e12
            if datasheet:
                row["momentkv_fraction_of_datasheet"] = row["momentkv_tbps"] / datasheet
            if copy_tbps:
                row["momentkv_fraction_of_copy"] = row["momentkv_tbps"] / copy_tbps
            sdpa_times = [row[k] for k in row if k.startswith("sdpa_") and k.endswith("_us") and row[k]]
            if sdpa_times:
                row["speedup_vs_best_sdpa"] = min(sdpa_times) / row["momentkv_us"]
            row["evict_fraction_of_attention"] = row["evict_us"] / row["momentkv_us"]
            rows.append(row)
            del sets, evict_sets
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return dict(device=name, datasheet_tbps=datasheet, copy_tbps=copy_tbps, dtype=str(dtype), rows=rows, skipped=skipped,
                versions=versions(), shapes="32 query heads, 8 KV heads, head_dim 128, one query per sequence")


def format_table(result: dict[str, Any]) -> str:
    head = (f"{result['device']} | copy {result['copy_tbps'] or float('nan'):.2f} TB/s | datasheet "
            f"{result['datasheet_tbps'] or float('nan')} TB/s | {result['dtype']}")
    lines = [head, "batch  keys   momentkv_us  sdpa_flash_us  sdpa_eff_us  speedup  TB/s   %copy  evict_us  evict%  relerr"]
    for r in result["rows"]:
        lines.append(
            f"{r['batch']:5d} {r['keys']:6d} {r['momentkv_us']:12.1f} {r.get('sdpa_flash_us') or float('nan'):14.1f} "
            f"{r.get('sdpa_efficient_us') or r.get('sdpa_math_us') or float('nan'):12.1f} "
            f"{r.get('speedup_vs_best_sdpa', float('nan')):8.2f} {r['momentkv_tbps']:6.2f} "
            f"{100 * r.get('momentkv_fraction_of_copy', float('nan')):6.1f} {r['evict_us']:9.1f} "
            f"{100 * r['evict_fraction_of_attention']:6.2f} {r['rel_error']:.1e}")
    return "\n".join(lines)


def main(out: str | None, keys: list[int], batches: list[int], device: str) -> dict[str, Any]:
    result = run_kernel_bench(keys, batches, device)
    print(format_table(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv bench-kernels``' options."""
    parser.add_argument("--keys", default="1024,2048,4096,8192,16384,32768", help="comma-separated key counts")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when available")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv bench-kernels``: returns the exit code."""
    from .models import default_device

    main(args.out, [int(k) for k in args.keys.split(",")], [int(b) for b in args.batches.split(",")],
         default_device(args.device))
    return 0
