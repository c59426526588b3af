"""What every committed result records about where it came from: versions and commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

OPENMP_SETTINGS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def commit() -> str:
    """The checked-out commit (``MOMENTKV_COMMIT`` where the tree travels without its git folder), or "unknown";
    "+modified" when tracked files differ from it, so that a result never claims a commit it did not run."""
    if os.environ.get("MOMENTKV_COMMIT"):
        return os.environ["MOMENTKV_COMMIT"]
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,  # noqa: E731
                                       cwd=Path(__file__).parent).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        return (head + ("+modified" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Python, torch (and its CUDA), transformers, Triton (or "absent"), momentkv, the commit, and the OpenMP
    settings that change CPU timings where they are set (OMP_WAIT_POLICY=PASSIVE tripled both caches' speed beside
    busy processes, docs/results.md "Under load")."""
    import transformers

    import momentkv

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
             "transformers": transformers.__version__, "momentkv": momentkv.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = "absent"
    found["commit"] = commit()
    found.update({name: os.environ[name] for name in OPENMP_SETTINGS if name in os.environ})
    return found
