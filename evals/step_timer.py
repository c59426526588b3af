"""Per-step timing and memory sampling inside ``generate()`` (no momentkv imports, so that the
kvpress runner can use it from its own environment)."""

from __future__ import annotations

import ctypes
import gc
import os
import re
import time
from statistics import median, quantiles

import torch
from transformers import StoppingCriteria


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fresh_peak() -> bool:
    """Start a new peak of resident memory: freed memory handed back to the system (garbage collected, glibc's heap
    trimmed), then the kernel's high-water mark reset to what is resident now (Linux's ``clear_refs``). Returns
    whether the mark could be reset."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of resident memory (since the last :func:`fresh_peak`)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


class StepTimer(StoppingCriteria):
    """Called once per generated token: the first call follows the prefill, the rest each decode step.
    With a ``deadline`` (a ``time.perf_counter()`` value) it stops the generation once that has passed.
    ``rss_peak`` is the process's peak resident memory from the timer's creation on, what a step holds between two
    calls included; where the kernel's mark cannot be reset, the most resident at any call."""

    def __init__(self, device: torch.device, deadline: float | None = None):
        self.resets = fresh_peak()
        self.device, self.times, self.rss_start, self.sampled_peak = device, [], rss_bytes(), 0
        self.deadline = deadline

    @property
    def rss_peak(self) -> int:
        return peak_rss_bytes() if self.resets else self.sampled_peak

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        if not self.resets:
            self.sampled_peak = max(self.sampled_peak, rss_bytes())
        late = self.deadline is not None and self.times[-1] > self.deadline
        return torch.full((input_ids.shape[0],), late, dtype=torch.bool, device=input_ids.device)

    def summary(self, batch: int) -> dict:
        steps = [b - a for a, b in zip(self.times, self.times[1:])]
        return dict(decode_steps=len(steps), step_ms_median=1e3 * median(steps),
                    step_ms_p99=1e3 * (quantiles(steps, n=100)[98] if len(steps) > 1 else steps[0]),
                    tokens_per_second=batch * len(steps) / (self.times[-1] - self.times[0]),
                    rss_growth_bytes=self.rss_peak - self.rss_start, rss_peak_bytes=self.rss_peak,
                    curve=step_curve(steps))


def step_curve(steps: list[float]) -> list[list[float]]:
    """[generated length L, median step ms over the steps just before L] at L = 64, 128, 256, ... and the last
    step: how the step time moves along one generation (a full cache's grows with its length)."""
    points, length = [], 64
    while length < len(steps):
        points.append(length)
        length *= 2
    points.append(len(steps))
    return [[end, 1e3 * median(steps[end - max(16, end // 8):end])] for end in points if end >= 16]


def held_bytes(cache) -> int:
    """Bytes every layer of a cache holds: a momentkv budgeted layer its buffers (slots, scores, moments), any other
    layer (transformers' own: full, sliding-window, linear-attention) every tensor it keeps, scalar counters aside.
    In a hybrid model the budget governs only the first kind; the rest is memory all the same."""
    return sum(layer.nbytes() if hasattr(layer, "nbytes") else
               sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor) and t.dim())
               for layer in cache.layers)


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)
