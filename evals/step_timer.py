"""Per-step timing and memory sampling inside ``generate()`` (no momentkv imports, so that the
kvpress runner can use it from its own environment)."""

from __future__ import annotations

import os
import time
from statistics import median

import torch
from transformers import StoppingCriteria


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StepTimer(StoppingCriteria):
    """Called once per generated token: the first call follows the prefill, the rest each decode step.
    With a ``deadline`` (a ``time.perf_counter()`` value) it stops the generation once that has passed."""

    def __init__(self, device: torch.device, deadline: float | None = None):
        self.device, self.times, self.rss_start, self.rss_peak = device, [], rss_bytes(), 0
        self.deadline = deadline

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.rss_peak = max(self.rss_peak, rss_bytes())
        late = self.deadline is not None and self.times[-1] > self.deadline
        return torch.full((input_ids.shape[0],), late, dtype=torch.bool, device=input_ids.device)

    def summary(self, batch: int) -> dict:
        steps = [b - a for a, b in zip(self.times, self.times[1:])]
        return dict(decode_steps=len(steps), step_ms_median=1e3 * median(steps),
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
