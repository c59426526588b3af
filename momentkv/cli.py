"""The ``momentkv`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from momentkv.evals.suite import WORKLOADS, Settings

    defaults = Settings()
    words = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    parser.add_argument("--out", default="results/eval/fidelity.json",
                        help="results JSON; an existing file is resumed (finished cells are skipped)")
    parser.add_argument("--workloads", type=words, default=defaults.workloads, help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--methods", type=words, default=(), help="comma-separated method names (default: all)")
    for name, value in vars(defaults).items():
        if name in ("workloads", "methods"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=words if isinstance(value[0], str) else ints, default=value,
                                help=f"comma-separated (default {','.join(map(str, value))})")
        else:
            parser.add_argument(flag, type=int, default=value, help=f"(default {value})")
    parser.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON"),
                        help="Python of an environment with kvpress 0.5.5, to add its presses (default $KVPRESS_PYTHON)")
    parser.add_argument("--report-only", action="store_true", help="only write the markdown table and plots")


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dataclasses import fields
    from pathlib import Path

    from momentkv.evals.report import write_report
    from momentkv.evals.suite import Results, Settings, Suite

    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    try:
        settings.check()
    except ValueError as error:
        parser.error(str(error))
    results = Results(Path(args.out))
    if not args.report_only:
        import torch

        from momentkv.evals.models import load_smollm2, smollm2_checkpoint

        torch.manual_seed(0)
        model, tokenizer = load_smollm2()
        try:
            suite = Suite(model, tokenizer, settings, results, str(smollm2_checkpoint()), args.kvpress_python)
        except ValueError as error:
            parser.error(str(error))
        suite.run()
    for path in write_report(results):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="momentkv", description="Fixed-size KV cache for transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="long answer from SmolLM2-135M-Instruct with a small budget (offline)")
    demo.add_argument("--budget", type=int, default=64, help="decode slots per layer and KV head (default 64)")
    demo.add_argument("--new-tokens", type=int, default=512, help="tokens to generate (default 512)")
    demo.add_argument("--prompt", help="the user message (default: a long-essay request)")
    demo.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    demo.add_argument("--json", help="also write the summary to this file")
    bench = commands.add_parser("bench-kernels", help="decode attention vs SDPA, eviction cost (GPU; prints a table)")
    bench.add_argument("--keys", default="1024,2048,4096,8192,16384,32768", help="comma-separated key counts")
    bench.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    bench.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    bench.add_argument("--out", help="write the results as JSON to this file")
    bench = commands.add_parser("bench", help="end-to-end decoding speed and memory vs full cache and kvpress")
    bench.add_argument("--model", default="smollm2", choices=["smollm2", "llama-3.1-8b-random"])
    bench.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    bench.add_argument("--prompt-len", type=int, default=512)
    bench.add_argument("--lengths", default="256,512", help="generated lengths, comma-separated")
    bench.add_argument("--budgets", default="64,256")
    bench.add_argument("--batches", default="1")
    bench.add_argument("--repeats", type=int, default=2)
    bench.add_argument("--systems", default="full-dynamic,full-static-compiled,momentkv-eager,momentkv-compiled,"
                                            "kvpress-i1,kvpress-i16")
    bench.add_argument("--kvpress-python", help="python of an environment with kvpress (transformers < 5.3)")
    bench.add_argument("--out", help="write the results as JSON to this file")
    bench.add_argument("--plot", help="write a tokens/s plot (PNG) to this file")
    profile = commands.add_parser("profile-step", help="split a decode step's time: attention, eviction, rest")
    profile.add_argument("--model", default="smollm2", choices=["smollm2", "llama-3.1-8b-random"])
    profile.add_argument("--device", default=None)
    profile.add_argument("--prompt-len", type=int, default=512)
    profile.add_argument("--new-tokens", type=int, default=256)
    profile.add_argument("--budget", type=int, default=64)
    profile.add_argument("--batch", type=int, default=1)
    profile.add_argument("--out", help="write the split as JSON to this file")
    longrun = commands.add_parser("long-run", help="long generation with a small budget: flat memory, no NaN")
    longrun.add_argument("--tokens", type=int, default=20000)
    longrun.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    longrun.add_argument("--device", default="cpu")
    longrun.add_argument("--budget", type=int, default=32)
    longrun.add_argument("--out", help="write the results as JSON to this file")
    evaluate = commands.add_parser("eval", help="fidelity of every method against the full cache (SmolLM2, offline)")
    add_eval_arguments(evaluate)
    models = commands.add_parser("models", help="patch a tiny model of every causal-LM architecture of the installed "
                                                "transformers: exact or refused (writes docs/models.md)")
    models.add_argument("--out", default="docs/models.md", help="markdown table to write (default docs/models.md)")
    models.add_argument("--json", help="also write the outcomes as JSON to this file")
    models.add_argument("--only", default="", help="comma-separated model types (default: every one)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from momentkv.demo import PROMPT, run_demo

        if args.new_tokens < 1:
            parser.error("--new-tokens must be >= 1")
        summary = run_demo(budget=args.budget, new_tokens=args.new_tokens, prompt=args.prompt or PROMPT,
                           compile=args.compile)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    elif args.command == "bench-kernels":
        import torch

        from momentkv.evals.kernel_bench import main as bench_main

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        bench_main(args.out, [int(k) for k in args.keys.split(",")], [int(b) for b in args.batches.split(",")],
                   device)
    elif args.command == "bench":
        from momentkv.evals.bench import format_table, plot, run_bench
        from momentkv.evals.models import bench_model

        model, folder = bench_model(args.model, args.device)
        ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
        result = run_bench(model, folder, args.prompt_len, ints(args.lengths), ints(args.budgets),
                           ints(args.batches), args.systems.split(","), args.repeats, args.kvpress_python)
        print(format_table(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        if args.plot:
            plot(result, args.plot)
    elif args.command == "profile-step":
        from momentkv.evals.models import bench_model
        from momentkv.evals.step_profile import profile_step

        model, _ = bench_model(args.model, args.device)
        result = profile_step(model, args.prompt_len, args.new_tokens, args.budget, args.batch)
        print(f"step {result['step_ms']:.2f} ms over {result['budgeted_layers']} budgeted layers "
              f"({result['cpu_kernel']} CPU kernels; attention per layer {result['per_layer_us']['attention_and_momentum']:.0f}"
              f" us called directly, {result['attention_through_dispatcher_us']:.0f} us through the dispatcher):")
        for name, ms in result["split_ms"].items():
            print(f"  {name:24s} {ms:8.2f} ms  {100 * result['split_fraction'][name]:5.1f}%")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    elif args.command == "eval":
        return run_eval(args, parser)
    elif args.command == "models":
        from pathlib import Path

        from momentkv.evals.architectures import sweep, to_json, write_markdown

        outcomes = sweep([t for t in args.only.split(",") if t] or None)
        write_markdown(outcomes, Path(args.out))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(outcomes), f, indent=2)
        if any(o.outcome in ("wrong", "crash") for o in outcomes):
            return 1
    elif args.command == "long-run":
        import torch

        from momentkv.evals.long_run import long_run, summary

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


if __name__ == "__main__":
    sys.exit(main())
