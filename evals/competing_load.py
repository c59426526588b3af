"""A loaded machine on demand: busy processes beside a benchmark, as users' machines rarely are quiet.

``momentkv bench --competing N`` runs every measurement beside N processes that spin on the CPU, so that the systems
it interleaves are compared under the same load (issue 39: a user saw momentkv fall further behind the full cache
on a loaded machine than a quiet one shows).
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """Run the body beside ``processes`` busy Python processes (none for 0); they are killed on the way out."""
    if processes < 0:
        raise ValueError(f"competing processes must be at least 0, got {processes}")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()
