"""The ``momentkv`` command line.

Every command lives beside the code it runs: the module named in :data:`COMMANDS` defines
``add_arguments(parser)`` (the command's options) and ``run_command(args, parser)`` (runs it and returns the exit
code). Only the chosen command's module is imported, so ``momentkv --help`` lists every command (from the help
texts here) without importing any of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("momentkv: a fixed-size KV cache for Hugging Face transformers. Each command's --help lists its "
               "options and defaults.")

COMMANDS: tuple[tuple[str, str, str], ...] = (  # (name, module, help), in the order --help lists them
    ("demo", "momentkv.evals.demo",
     "the full cache and momentkv side by side on one prompt: SmolLM2-135M-Instruct, offline, sampled answers, "
     "memory, speed and agreement (about 2 minutes on a 2-core CPU)"),
    ("bench-kernels", "momentkv.evals.kernel_bench",
     "decode attention against SDPA (flash, efficient) at Llama-3.1-8B head shapes, and eviction's cost (GPU; "
     "prints a table)"),
    ("bench", "momentkv.evals.bench",
     "end-to-end decoding speed and memory: momentkv against transformers' full caches and kvpress, runs "
     "interleaved; under torchrun, tensor-parallel with memory per rank"),
    ("profile-step", "momentkv.evals.step_profile",
     "a decode step's time: the budgeted layers' in the generation, and each kernel's"),
    ("long-run", "momentkv.evals.long_run",
     "a long generation with a small budget: memory flat, every number finite"),
    ("eval", "momentkv.evals.suite",
     "fidelity of every method against the full cache on SmolLM2, offline"),
    ("figures", "momentkv.evals.figures",
     "every committed table and figure rebuilt from its result (results/ by default)"),
    ("models", "momentkv.evals.architectures",
     "patch a tiny model of every causal-LM architecture of the installed transformers: exact or refused (writes "
     "docs/models.md)"),
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, once: not where the help text already says it, nor where there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or unsaid:
            return text
        return super()._get_help_string(action)


def _parser(chosen: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top parser and each command's subparser. Without ``chosen``, the subparsers take no options (not even
    ``--help``): enough to read the command name. With it, they take ``--help`` as usual."""
    parser = argparse.ArgumentParser(prog="momentkv", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers = {name: commands.add_parser(name, help=text, description=text, add_help=chosen is not None,
                                            formatter_class=HelpFormatter)
                  for name, _, text in COMMANDS}
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    name = _parser()[0].parse_known_args(argv)[0].command  # exits on --help, no command or an unknown one
    module = importlib.import_module(dict((n, m) for n, m, _ in COMMANDS)[name])
    parser, subparsers = _parser(name)
    module.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    return module.run_command(args, parser)


if __name__ == "__main__":
    sys.exit(main())
