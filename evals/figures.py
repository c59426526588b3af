"""``momentkv figures``: every committed table and figure rebuilt from its result, in one command.

What a result rebuilds is read off the result itself, so no list here can fall behind: a results file of
``momentkv eval`` its tables, plots and headline picture (labels from each method's configuration: "(default)"
follows the library's defaults); a RULER file its tables; a benchmark result with a picture committed beside it,
that picture (a throughput-at-a-cap result the capacity plot, any other the bench plot); and ``claims.md``, the
seeds' claims checked against every fidelity result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rebuild(folder: Path) -> list[Path]:
    """Rewrite what each result under ``folder`` produces; returns the files written."""
    from . import bench, capacity, claims, ruler
    from .report import write_report
    from .suite import Results

    written: list[Path] = []
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "cells" not in data and "rows" not in data:
            continue
        if "cells" in data and "limit" in data:  # RULER's cells share one sample count
            path.with_suffix(".md").write_text(ruler.markdown(data))
            written.append(path.with_suffix(".md"))
        elif "cells" in data:
            written += write_report(Results(path))
        elif path.with_suffix(".png").exists():
            (capacity.plot if "max_batch" in data else bench.plot)(data, str(path.with_suffix(".png")))
            written.append(path.with_suffix(".png"))
    if claims.model_files(folder):  # fidelity results: the claims checked against them
        written.append(claims.write(folder))
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results"), help="the folder of results, searched whole")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.results.is_dir():
        parser.error(f"--results: {args.results} is not a folder")
    for path in rebuild(args.results):
        print(f"wrote {path}")
    return 0
