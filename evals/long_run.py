"""Long generation with a small budget: memory must stay flat and every number finite.

A random-weight Llama (speed and memory do not depend on the weights) generates N tokens
through ``generate()`` with momentkv. Every step, a logits processor folds "no NaN or +inf
in the scores" into a device flag (no host sync); at checkpoints, process RSS, allocated GPU memory and the
cache's moment statistics are read.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

import momentkv

from .step_timer import rss_bytes


class Watch(LogitsProcessor):
    def __init__(self, model, every: int, device: torch.device):
        self.model, self.every, self.step = model, every, 0
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.checkpoints: list[dict[str, Any]] = []

    def __call__(self, input_ids, scores):
        # -inf is a legitimate masked logit (min_new_tokens masks EOS); NaN and +inf are not.
        self.finite &= ~(torch.isnan(scores) | (scores == float("inf"))).any()
        self.step += 1
        if self.step % self.every == 0:
            layers = momentkv.state_of(self.model).active.budgeted_layers
            stats = [t for layer in layers for t in (layer.state.n, layer.state.mu_k, layer.state.mu_v, layer.state.comoment, layer.state.importance,
                                                      layer.state.normalizer)]
            point = dict(step=self.step, rss_bytes=rss_bytes(), scores_finite=bool(self.finite),
                         moments_finite=all(bool(torch.isfinite(t).all()) for t in stats),
                         evicted_per_head=float(layers[0].state.n.mean()))
            if scores.is_cuda:
                point["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            self.checkpoints.append(point)
        return scores


@dataclass
class LongRun:
    tokens: int
    dtype: str
    device: str
    budget: int
    seconds: float = 0.0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finite(self) -> bool:
        return all(p["scores_finite"] and p["moments_finite"] for p in self.checkpoints)

    def growth_after_warmup(self, key: str = "rss_bytes") -> int:
        """Memory growth from the second checkpoint (warm-up done) to the last."""
        values = [p[key] for p in self.checkpoints if key in p]
        return values[-1] - values[1] if len(values) > 2 else 0


def random_llama(dtype: torch.dtype, device: str, max_positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def long_run(tokens: int, dtype: torch.dtype = torch.float32, device: str = "cpu", budget: int = 32,
             every: int = 500) -> LongRun:
    model = random_llama(dtype, device, max_positions=tokens + 1024)
    prompt = torch.randint(3, 1024, (1, 64), device=device)
    watch = Watch(model, every, torch.device(device))
    run = LongRun(tokens=tokens, dtype=str(dtype).replace("torch.", ""), device=device, budget=budget)
    with momentkv.patched(model, budget=budget):
        start = time.perf_counter()
        model.generate(input_ids=prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=0, logits_processor=LogitsProcessorList([watch]))
        run.seconds = time.perf_counter() - start
    run.checkpoints = watch.checkpoints
    return run


def summary(run: LongRun) -> dict[str, Any]:
    out = asdict(run)
    out.update(finite=run.finite, rss_growth_after_warmup_bytes=run.growth_after_warmup(),
               tokens_per_second=run.tokens / run.seconds)
    if run.checkpoints and "cuda_allocated_bytes" in run.checkpoints[0]:
        out["cuda_growth_after_warmup_bytes"] = run.growth_after_warmup("cuda_allocated_bytes")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv long-run``'s options."""
    parser.add_argument("--tokens", type=int, default=20000, help="tokens to generate")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--budget", type=int, default=32, help="momentkv budget")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv long-run``: returns the exit code, 1 where a number was not finite."""
    results = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            parser.error(f"--dtypes: unknown torch dtype {name!r}")
        result = summary(long_run(args.tokens, dtype, args.device, args.budget))
        results.append(result)
        print(f"{name}: {args.tokens} tokens in {result['seconds']:.0f} s, finite={result['finite']}, "
              f"RSS growth after warm-up {result['rss_growth_after_warmup_bytes'] / 2**20:.2f} MiB"
              + (f", CUDA growth {result['cuda_growth_after_warmup_bytes']} B"
                 if "cuda_growth_after_warmup_bytes" in result else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if not all(r["finite"] for r in results):
        return 1
    return 0
