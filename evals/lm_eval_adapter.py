"""lm-evaluation-harness with the budgeted cache: the ``momentkv`` model and the ``momentkv-lm-eval`` command.

``--model momentkv --model_args pretrained=<folder, "smollm2" or "gemma3-270m">,budget=64,alpha=0.9,...`` takes every
:class:`MomentKVConfig` option, ``compile``, ``preset`` (a published rule of :mod:`momentkv.presets`,
the other options overriding it) and ``compression_ratio`` (kvpress's measure: each prompt keeps
``kept_tokens(length, ratio)`` tokens, as a kvpress press at that ratio would). ``generate_until`` runs through
the patched ``generate``. Log-likelihoods stream the continuation through the compressed cache one token
at a time (the context is the prompt), instead of lm-eval's single full-sequence forward, which
would never evict anything.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers import LogitsProcessorList

import momentkv
from momentkv import MomentKVConfig
from momentkv.presets import PRESETS

from .fidelity import TeacherForcing
from .models import OFFLINE_MODELS, checkpoint, default_device
from .ratios import check_compression_ratio, prefill_budget
from .ruler import TASKS as RULER_TASKS, import_quietly

TASKS = Path(__file__).with_name("tasks")
OPTIONS = {f.name for f in fields(MomentKVConfig)}


def resolve_pretrained(pretrained: Any) -> Any:
    """An offline model's name ("smollm2", "gemma3-270m") becomes its checkpoint folder; anything else is passed
    through."""
    return str(checkpoint(pretrained)) if isinstance(pretrained, str) and pretrained in OFFLINE_MODELS else pretrained


@register_model("momentkv")
class MomentKVLM(HFLM):
    """lm-eval's HF model with ``momentkv.patch`` applied."""

    def __init__(self, pretrained: Any = "smollm2", budget: int = 64, compile: bool | None = None,
                 preset: str | None = None, compression_ratio: float | None = None, **kwargs: Any):
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in OPTIONS}
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        if compression_ratio is not None:
            check_compression_ratio(compression_ratio)
            if options.get("prefill_budget") is not None:
                raise ValueError("compression_ratio and prefill_budget both set: give one (the ratio sets a prefill "
                                 "budget per prompt)")
            if str(kwargs.get("batch_size", 1)) != "1":
                raise ValueError("batch_size must be 1 with compression_ratio (each prompt gets its own prefill "
                                 f"budget), got {kwargs['batch_size']}")
        make = PRESETS[preset] if preset else MomentKVConfig
        self.momentkv_config = make(budget, **options)  # validated before the model loads
        self.compression_ratio, self.compile = compression_ratio, compile
        kwargs.setdefault("device", default_device())
        super().__init__(pretrained=resolve_pretrained(pretrained), **kwargs)
        momentkv.patch(self.model, config=self.momentkv_config, compile=compile)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        if self.compression_ratio is not None:  # this prompt's prefill budget: the model patched anew if it differs
            kept = prefill_budget(context.shape[1], self.compression_ratio, self.momentkv_config.sinks)
            if momentkv.state_of(self.model).config.prefill_budget != kept:
                config = dataclasses.replace(self.momentkv_config, prefill_budget=kept)
                momentkv.unpatch(self.model)
                momentkv.patch(self.model, config=config, compile=self.compile)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, continuation is greedy) per request, through the compressed cache."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        batch = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), batch), disable=disable_tqdm or self.rank != 0,
                          desc="Streaming loglikelihood requests"):
            chunk = [requests[i] for i in order[start:start + batch]]
            for index, answer in zip(order[start:start + batch], self._stream(chunk)):
                results[index] = answer
                request_str = requests[index][0]
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def _stream(self, chunk: list) -> list[tuple[float, bool]]:
        """Prefill each context (left-padded), then force each continuation token by token."""
        contexts, continuations = [], []
        for _, context, continuation in chunk:
            whole = (context + continuation)[-(self.max_length + 1):]  # lm-eval truncates from the left
            contexts.append(whole[:len(whole) - len(continuation)] or whole[:1])
            continuations.append(whole[len(contexts[-1]):])
        width, steps = max(map(len, contexts)), max(map(len, continuations))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=self.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=self.device)
        targets = torch.tensor([c + [pad] * (steps - len(c)) for c in continuations], device=self.device)
        forcing = TeacherForcing(targets)
        self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                            eos_token_id=None, pad_token_id=pad, logits_processor=LogitsProcessorList([forcing]))
        logprob, agree = torch.stack(forcing.logprob, 1), torch.stack(forcing.agree, 1)
        return [(logprob[row, :len(c)].sum().item(), bool(agree[row, :len(c)].all()))
                for row, c in enumerate(continuations)]


# At 4,096 tokens, lm-eval's own RULER length: at any other it also prints a -1 row for 4,096 and a warning.
EXAMPLE = ("momentkv-lm-eval --model momentkv --model_args pretrained=smollm2,budget=128,prefill_budget=1024 "
           "--tasks niah_single_1 --limit 4 --batch_size 4 --apply_chat_template "
           "--metadata '{\"max_seq_lengths\": [4096]}'")


def usage() -> str:
    """What ``momentkv-lm-eval --help`` says (lm-eval's own help is one command away)."""
    tasks = ", ".join(sorted(path.stem for path in TASKS.glob("*.yaml")))
    items = {
        "--model momentkv": "lm-eval's HF model with momentkv.patch applied: generate_until runs the patched "
                            "generate; log-likelihoods stream the continuation through the budgeted cache token by token.",
        "--model_args": "pretrained=<folder, hub id, or an offline model: smollm2 (SmolLM2-135M-Instruct), gemma3-270m "
                        "(Gemma 3 270M, base)>, budget=<int>, "
                        f"compile=<bool>, preset=<{'|'.join(PRESETS)}>, any MomentKVConfig option ({', '.join(sorted(OPTIONS - {'budget'}))}), "
                        "and lm-eval's HF arguments (dtype, device, max_length, ...).",
        "bundled tasks": f"{tasks} (tag momentkv), generated offline and sized by --metadata "
                         '\'{"context_tokens": 4096, "samples": 20, "document_tokens": 4096}\' (the defaults).',
        "RULER": f"lm-eval's ruler tasks generated offline (wonderwords, nltk): {', '.join(RULER_TASKS)}, sized by "
                 "--metadata '{\"max_seq_lengths\": [4096]}' (lm-eval scores its own lengths: at another, its table "
                 "also shows 4096 as -1 and warns of no aggregation); python -m momentkv.evals.ruler runs them for "
                 "several methods into one table.",
        "everything else": "lm-eval's own command line: momentkv-lm-eval run --help",
    }
    lines = ["momentkv-lm-eval: lm-evaluation-harness with momentkv's budgeted cache.", "", f"  {EXAMPLE}", ""]
    for name, text in items.items():
        lines.append(textwrap.fill(text, 100, initial_indent=f"{name:<18}", subsequent_indent=" " * 18))
    return "\n".join(lines)


def _resolve_model_args(argv: list[str]) -> list[str]:
    """``pretrained=<offline model>`` in ``--model_args`` becomes the checkpoint's folder before lm-eval parses it,
    so that everything reading the model arguments (RULER's tokenizer among them) finds the model offline."""
    out, follows = [], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if follows or (flag == "--model_args" and eq):
            value = arg if follows else value
            value = ",".join(f"pretrained={resolve_pretrained(item.strip()[len('pretrained='):])}"
                             if item.strip().startswith("pretrained=") else item for item in value.split(","))
            arg = value if follows else f"--model_args={value}"
        follows = arg == "--model_args"
        out.append(arg)
    return out


# lm-eval's command name where its help shows it (not inside other words, nor in "lm-eval's").
LM_EVAL_COMMAND = re.compile(r"(?<![\w-])lm-eval(?=[ \n]|$)")


def main(argv: list[str] | None = None) -> None:
    """``momentkv-lm-eval``: lm-eval's own command line, with the ``momentkv`` model registered and
    momentkv's offline tasks on the include path."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"]):
        print(usage())
        return
    if argv and argv[0] not in ("run", "ls", "validate", "-h", "--help"):
        argv = ["run", *argv]  # lm-eval's subcommands; without one it runs "run"
    if argv and argv[0] in ("run", "ls", "validate") and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS)]
    if any(name in arg for arg in argv for name in ("niah", "ruler")):
        import_quietly()  # before lm-eval loads the RULER tasks, which would print a false "Downloaded" offline
    sys.argv = ["momentkv-lm-eval", *_resolve_model_args(argv)]
    setup_logging()
    cli = HarnessCLI()  # lm-eval's own command line (its cli_evaluate), under this command's name in its help
    for parser in (cli._parser, *cli._subparsers.choices.values()):
        for field in ("prog", "usage", "epilog"):
            if getattr(parser, field):
                setattr(parser, field, LM_EVAL_COMMAND.sub("momentkv-lm-eval", getattr(parser, field)))
        for action in parser._actions:
            action.help = action.help and LM_EVAL_COMMAND.sub("momentkv-lm-eval", action.help)
    cli.execute(cli.parse_args())
