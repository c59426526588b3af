"""The ``momentkv`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from momentkv.evals.suite import SETTINGS_HELP, WORKLOADS, Settings

    defaults = Settings()
    words = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    parser.add_argument("--out", default="results/eval/fidelity.json",
                        help="results JSON; an existing file is resumed (finished cells are skipped)")
    parser.add_argument("--workloads", type=words, default=",".join(defaults.workloads),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--methods", type=words, default="", help="comma-separated method names; empty: every one")
    for name, value in vars(defaults).items():
        if name in ("workloads", "methods"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=words if isinstance(value[0], str) else ints,
                                default=",".join(map(str, value)),  # argparse parses a string default
                                help=f"{SETTINGS_HELP[name]}, comma-separated")
        else:
            parser.add_argument(flag, type=int, default=value, help=SETTINGS_HELP[name])
    parser.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON"),
                        help="python of an environment with kvpress 0.5.5, to add its presses (default: $KVPRESS_PYTHON)")
    parser.add_argument("--report-only", action="store_true", help="only write the markdown table and plots")


def _eval_epilog() -> str:
    from momentkv.evals.methods import FULL, METHODS
    from momentkv.evals.suite import WORKLOADS

    return (f"workloads: {', '.join(WORKLOADS)}. methods: {FULL} (the reference), {', '.join(METHODS)}; "
            "each is described in momentkv/evals/methods.py and docs/results.md. The default run takes hours on "
            "a CPU; --workloads, --methods and --budgets narrow it.")


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
    parser = argparse.ArgumentParser(prog="momentkv", description="momentkv: a fixed-size KV cache for Hugging Face "
                                     "transformers. Each command's --help lists its options and defaults.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = lambda name, text, **kwargs: commands.add_parser(  # noqa: E731
        name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
    demo = command("demo", "the full cache and momentkv side by side on one prompt: SmolLM2-135M-Instruct, offline, "
                           "sampled answers, memory, speed and agreement (about 2 minutes on a 2-core CPU)")
    demo.add_argument("--budget", type=int, default=64, help="decode slots per layer and KV head")
    demo.add_argument("--new-tokens", type=int, default=512, help="tokens to generate in each pass")
    demo.add_argument("--prompt", default=None, help="the user message (default: a long-essay request)")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both answers")
    demo.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    demo.add_argument("--json", default=None, help="also write the summary and both answers to this file")
    bench = command("bench-kernels", "decode attention against SDPA (flash, efficient) at Llama-3.1-8B head shapes, "
                                     "and eviction's cost (GPU; prints a table)")
    bench.add_argument("--keys", default="1024,2048,4096,8192,16384,32768", help="comma-separated key counts")
    bench.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    bench.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when available")
    bench.add_argument("--out", default=None, help="write the results as JSON to this file")
    bench = command("bench", "end-to-end decoding speed and memory: momentkv against transformers' full caches and "
                             "kvpress, runs interleaved; under torchrun, tensor-parallel with memory per rank")
    bench.add_argument("--model", default="smollm2",
                       help="smollm2 (the real SmolLM2-135M, offline), llama-3.1-8b-random (Llama-3.1-8B's shapes, "
                            "random weights) or a checkpoint folder; under torchrun the model is sharded by heads "
                            "(tensor parallelism) and every rank's memory is reported")
    bench.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when available")
    bench.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (random ids)")
    bench.add_argument("--lengths", default="256,512", help="generated lengths, comma-separated")
    bench.add_argument("--budgets", default="64,256", help="momentkv budgets, comma-separated")
    bench.add_argument("--batches", default="1", help="batch sizes, comma-separated")
    bench.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every run (the median is kept)")
    bench.add_argument("--systems", default="full-dynamic,full-static-compiled,momentkv-eager,momentkv-compiled,"
                                            "kvpress-i1,kvpress-i16",
                       help="comma-separated, of full-dynamic, full-static-compiled, momentkv-eager, "
                            "momentkv-compiled, momentkv-cudagraphs (CUDA only), kvpress-i1, kvpress-i16 (kvpress only "
                            "with --kvpress-python; see evals/bench.py)")
    bench.add_argument("--kvpress-python", default=None,
                       help="python of an environment with kvpress 0.5.5 (transformers < 5.3), to add its presses")
    bench.add_argument("--out", default=None, help="write the results as JSON to this file")
    bench.add_argument("--plot", default=None, help="write a tokens/s plot (PNG) to this file")
    profile = command("profile-step", "a decode step's time: the budgeted layers' in the generation, and each kernel's")
    profile.add_argument("--model", default="smollm2", choices=["smollm2", "llama-3.1-8b-random"],
                         help="as for bench")
    profile.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when available")
    profile.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (random ids)")
    profile.add_argument("--new-tokens", type=int, default=256, help="generated tokens timed")
    profile.add_argument("--budget", type=int, default=64, help="momentkv budget")
    profile.add_argument("--batch", type=int, default=1, help="batch size")
    profile.add_argument("--out", default=None, help="write the split as JSON to this file")
    longrun = command("long-run", "a long generation with a small budget: memory flat, every number finite")
    longrun.add_argument("--tokens", type=int, default=20000, help="tokens to generate")
    longrun.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    longrun.add_argument("--device", default="cpu", help="cpu or cuda")
    longrun.add_argument("--budget", type=int, default=32, help="momentkv budget")
    longrun.add_argument("--out", default=None, help="write the results as JSON to this file")
    evaluate = command("eval", "fidelity of every method against the full cache on SmolLM2, offline", epilog=_eval_epilog())
    add_eval_arguments(evaluate)
    models = command("models", "patch a tiny model of every causal-LM architecture of the installed transformers: "
                               "exact or refused (writes docs/models.md)")
    models.add_argument("--out", default="docs/models.md", help="markdown table to write")
    models.add_argument("--json", default=None, help="also write the outcomes as JSON to this file")
    models.add_argument("--only", default="", help="comma-separated model types (default: every one)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from momentkv.demo import PROMPT, run_demo

        if args.new_tokens < 1:
            parser.error("--new-tokens must be >= 1")
        summary = run_demo(budget=args.budget, new_tokens=args.new_tokens, prompt=args.prompt or PROMPT,
                           compile=args.compile, seed=args.seed)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    elif args.command == "bench-kernels":
        from momentkv.evals.kernel_bench import main as bench_main
        from momentkv.evals.models import default_device

        bench_main(args.out, [int(k) for k in args.keys.split(",")], [int(b) for b in args.batches.split(",")],
                   default_device(args.device))
    elif args.command == "bench":
        from momentkv.evals.bench import SYSTEMS, format_table, plot, run_bench
        from momentkv.evals.models import bench_model, distributed

        systems = args.systems.split(",")
        unknown = [name for name in systems if name not in SYSTEMS]
        if unknown:
            parser.error(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
        if distributed() and any(name.startswith("kvpress") for name in systems):
            parser.error("--systems: kvpress runs in its own process, not under torchrun")
        try:
            model, folder = bench_model(args.model, args.device)
        except ValueError as error:
            parser.error(str(error))
        first = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports for every rank
        ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
        result = run_bench(model, folder, args.prompt_len, ints(args.lengths), ints(args.budgets),
                           ints(args.batches), systems, args.repeats, args.kvpress_python,
                           log=print if first else lambda line: None)
        if first:
            print(format_table(result))
            for rank, rows in enumerate(result.get("per_rank", [])):
                held = ", ".join(f"{r['system']} {r.get('cache_bytes', r.get('kv_bytes', 0)) / 2**20:.2f} MiB"
                                 for r in rows)
                print(f"rank {rank}: {held}")
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=2)
            if args.plot:
                plot(result, args.plot)
        if distributed():  # leave together: a rank exiting with the group alive can abort its peer's gloo threads
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    elif args.command == "profile-step":
        from momentkv.evals.models import bench_model
        from momentkv.evals.step_profile import profile_step

        model, _ = bench_model(args.model, args.device)
        result = profile_step(model, args.prompt_len, args.new_tokens, args.budget, args.batch)
        print(f"step {result['step_ms']:.2f} ms with {result['budgeted_layers']} budgeted layers, "
              f"{result['step_ms_without_budgeted_attention']:.2f} ms with their decode step a no-op, "
              f"{result['full_dynamic_step_ms']:.2f} ms with the dynamic full cache; the step costs "
              f"{result['step_per_layer_in_generation_us']:.0f} us per layer in the generation")
        print(f"per layer, warm ({result['cpu_kernel']} CPU kernels; the step through the dispatcher "
              f"{result['step_through_dispatcher_us']:.0f} us):")
        for name, us in result["per_layer_warm_us"].items():
            print(f"  {name:24s} {us:8.1f} us")
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
