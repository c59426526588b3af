"""Where a compiled decode step's time goes at a batch (docs/results.md, "Compiled against eager at larger batches").

Usage: OMP_NUM_THREADS=2 python scripts/probe-compiled-step.py VARIANT BATCH, one process per run (kernels are
compiled once a process). VARIANT: compiled (as shipped), op (the step an opaque op in the compiled graph, not
traced), fused (every decode product fused, as before commit 588aff2), eager, eager-fused, or profile (compiled,
each inductor kernel timed: the top 25 by self time). SmolLM2 fp32, a 512-token random prompt, budget 64; prints
the median step over 40 steps (24 when profiling).
"""

import sys

import torch

import momentkv
import momentkv.ops.attention as attention
import momentkv.ops.kernels as kernels
from momentkv.evals.bench import _compile_config, _generate
from momentkv.evals.models import bench_model
from momentkv.evals.step_timer import StepTimer

variant, batch = sys.argv[1], int(sys.argv[2])
if variant == "op":
    kernels.TRACED_ON_CPU = ()
if variant in ("fused", "eager-fused"):
    attention.FUSED_PRODUCT_BELOW = float("inf")
if variant == "profile":
    torch._inductor.config.cpp.enable_kernel_profile = True
model, _ = bench_model("smollm2", "cpu")
ids = torch.randint(10, model.config.vocab_size, (batch, 512), generator=torch.Generator().manual_seed(0))
options = {"disable_compile": True} if variant.startswith("eager") else {"compile_config": _compile_config("default")}
with momentkv.patched(model, budget=64):
    _generate(model, ids, 4, None, **options)  # compiles what the run compiles
    timer = StepTimer(torch.device("cpu"))
    if variant == "profile":
        with torch.profiler.profile() as profile:
            _generate(model, ids, 24, timer, **options)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    else:
        _generate(model, ids, 40, timer, **options)
print(variant, "batch", batch, "step ms median", round(timer.summary(batch)["step_ms_median"], 1))
