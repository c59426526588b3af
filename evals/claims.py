"""The seeds' claims, checked against the committed fidelity results: one row each, "claim | measured | holds?".

The pairs a claim compares are found from the methods' configurations (evals/methods.py), not listed by hand: two
methods that differ only in the moment correction, only in moment-informed eviction, or a rule with the prompt
kept against the recency window with the prompt kept. Every pair measured in one results file of the model counts
(never across files: two files may run one workload at other sizes), at every budget it was measured at, except
where neither method evicted anything (both KL 0); a claim holds where every one of its pairs agrees with it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from momentkv import MomentKVConfig

from .methods import METHODS, method

BUDGETS = (32, 256)  # configurations are related at both (options sized by the budget must follow it alike)
# The first seed: momentum eviction with the prompt kept against a recency window with the prompt kept, both
# without the correction, as published: its gain in top-1 agreement, points.
MOMENTUM_GAIN = (2.3, 3.2)


def _differ_only_in(a: MomentKVConfig, b: MomentKVConfig, **change: Any) -> bool:
    try:
        return dataclasses.replace(a, **change) == b
    except ValueError:  # the change alone is no valid configuration
        return False


def pairs(test: Callable[[MomentKVConfig, MomentKVConfig], bool]) -> list[tuple[str, str]]:
    """(without, with) for every two methods whose configurations ``test`` relates at every budget of BUDGETS."""
    return [(a, b) for a in METHODS for b in METHODS
            if a != b and all(test(method(a).config(n), method(b).config(n)) for n in BUDGETS)]


def _corrected(a: MomentKVConfig, b: MomentKVConfig) -> bool:
    return a.correction == "none" and _differ_only_in(a, b, correction="moments")


def _informed(a: MomentKVConfig, b: MomentKVConfig) -> bool:
    return a.moment_weight == 0 and b.moment_weight > 0 and _differ_only_in(a, b, moment_weight=b.moment_weight)


def _momentum_against_window(a: MomentKVConfig, b: MomentKVConfig) -> bool:
    """a: the recency window with the prompt kept, uncorrected; b: momentum eviction, otherwise alike but for the
    recent window the rule keeps."""
    return (a.policy == "window" and b.policy == "momentum" and a.protect_prompt and a.correction == "none"
            and _differ_only_in(a, b, policy="momentum", recent_window=b.recent_window,
                                alpha=b.alpha, bias_correction=b.bias_correction))


def measured(files: dict[str, dict[str, dict]], pair: tuple[str, str], metric: str) -> Iterator[tuple[str, float, float]]:
    """(file:workload/budget, without, with) wherever both methods of ``pair`` were measured in one file."""
    for stem, cells in files.items():
        for key, entry in cells.items():
            workload, name, *column = key.split("/")
            if name == pair[0] and len(column) == 1 and metric in entry:
                other = cells.get("/".join([workload, pair[1], *column]))
                if other and metric in other and not (metric == "kl" and entry[metric] == other[metric] == 0):
                    yield f"{stem}:{workload}/{column[0]}", entry[metric], other[metric]


def claims(files: dict[str, dict[str, dict]]) -> list[tuple[str, str, str]]:
    """(claim, measured, holds) rows from one model's results files (file name -> cells)."""
    rows = []
    gains = [(where, 100 * (mine - theirs))
             for pair in pairs(_momentum_against_window) for where, theirs, mine in measured(files, pair, "top1")]
    low, high = MOMENTUM_GAIN
    rows.append((f"momentum eviction, prompt kept, beats a recency window, prompt kept, by {low}-{high} points of "
                 "top-1 agreement (decode latency not compared here)",
                 "; ".join(f"{where}: {gain:+.1f}" for where, gain in gains) or "not measured",
                 "—" if not gains else "yes" if all(gain >= low for _, gain in gains) else
                 f"no: {sum(gain < low for _, gain in gains)} of {len(gains)} below {low}"))
    for claim, test in (("the moment correction lowers the error (KL) of every rule at every budget", _corrected),
                        ("moment-informed eviction lowers the error (KL)", _informed)):
        found = [(f"{a} -> {b} {where}", without, with_) for a, b in pairs(test)
                 for where, without, with_ in measured(files, (a, b), "kl")]
        worse = [f"{where} ({without:.3g} -> {with_:.3g})" for where, without, with_ in found if with_ >= without]
        rows.append((claim, f"{len(found) - len(worse)} of {len(found)} pairs lower" if found else "not measured",
                     "—" if not found else "yes" if not worse else "no: " + "; ".join(worse)))
    return rows


def model_files(folder: Path) -> dict[str, dict[str, dict[str, dict]]]:
    """Every suite result under ``folder`` by model (``environment.model``): file name -> cells."""
    found: dict[str, dict[str, dict[str, dict]]] = {}
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "cells" in data and "environment" in data:
            found.setdefault(data["environment"]["model"], {})[path.stem] = data["cells"]
    return found


def markdown(folder: Path) -> str:
    lines = ["# The seeds' claims, checked", "",
             "From every committed `momentkv eval` result, per model (`python -m momentkv.evals.claims`, also run by "
             "`momentkv figures`); the pairs compared are found from the methods' configurations (evals/claims.py). "
             "Each pair as file:workload/budget; top-1 in points, KL as measured.", ""]
    for model, files in model_files(folder).items():
        lines += [f"## {model}", "", "| claim | measured | holds? |", "|---|---|---|"]
        lines += [f"| {claim} | {found} | {holds} |" for claim, found, holds in claims(files)]
        lines.append("")
    return "\n".join(lines)


def write(folder: Path) -> Path:
    """``<folder>/claims.md`` from the results under ``folder``."""
    path = folder / "claims.md"
    path.write_text(markdown(folder))
    return path


def main() -> None:
    print(write(Path("results")).read_text())


if __name__ == "__main__":
    main()
