"""95% bootstrap intervals for scores averaged over tasks, and for the difference of two methods on the same samples.

A cell's score is the mean over tasks of each task's mean over its samples; a draw resamples each task's samples
with replacement (seeded, so a table is reproducible). Two methods run on the same samples are compared by
resampling the same indices for both (paired): a difference is called a win or a loss only when this interval
excludes 0.
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000


def _draws(tasks: list[list[float]], seed: int) -> list[np.ndarray]:
    """Per task, a (DRAWS, samples) array of resampled sample indices."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, len(scores), (DRAWS, len(scores))) for scores in tasks]


def _mean_over_tasks(tasks: list[list[float]], draws: list[np.ndarray]) -> np.ndarray:
    return np.mean([np.asarray(scores)[index].mean(1) for scores, index in zip(tasks, draws)], axis=0)


def bootstrap_mean(tasks: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """(mean over tasks of the per-task means, 2.5th percentile, 97.5th percentile)."""
    if not tasks or any(len(scores) == 0 for scores in tasks):
        raise ValueError("tasks: every task needs at least one sample's score")
    means = _mean_over_tasks(tasks, _draws(tasks, seed))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(np.mean([np.mean(s) for s in tasks])), float(low), float(high)


def paired_difference(a: list[list[float]], b: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """``a`` minus ``b`` (the same tasks, the same samples in the same order): the difference of the means and its
    95% interval, resampling the same samples for both."""
    if [len(s) for s in a] != [len(s) for s in b]:
        raise ValueError("a and b must hold the same samples: their tasks' sample counts differ")
    draws = _draws(a, seed)
    differences = _mean_over_tasks(a, draws) - _mean_over_tasks(b, draws)
    low, high = np.percentile(differences, [2.5, 97.5])
    mean = np.mean([np.mean(x) - np.mean(y) for x, y in zip(a, b)])
    return float(mean), float(low), float(high)
