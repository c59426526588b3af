"""lm-eval's HF model whose generations run under a kvpress prefill press, in kvpress's own environment.

Everything lm-eval does around a generation (chat template, tokenizing, truncation, stop strings, scoring) runs
here, in momentkv's environment, exactly as for the ``momentkv`` model; only ``generate`` itself is sent to a
worker (kvpress_generate.py) in an environment with kvpress 0.5.5. So a kvpress cell and a momentkv cell differ by
the cache alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import weakref
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .kvpress_generate import PRESSES
from .lm_eval_adapter import resolve_pretrained
from .models import default_device
from .ratios import check_compression_ratio

WORKER = Path(__file__).with_name("kvpress_generate.py")


@register_model("kvpress")
class KVPressLM(HFLM):
    """``--model kvpress --model_args pretrained=...,press=snapkv,compression_ratio=0.5[,python=...]``: batch 1
    (kvpress keeps no padding mask); ``python`` defaults to ``$KVPRESS_PYTHON``."""

    def __init__(self, pretrained: Any = "smollm2", press: str = "snapkv", compression_ratio: float = 0.5,
                 python: str | None = None, **kwargs: Any):
        if press not in PRESSES:
            raise ValueError(f"press must be one of {', '.join(PRESSES)}; got {press!r}")
        check_compression_ratio(compression_ratio)
        if str(kwargs.get("batch_size", 1)) != "1":
            raise ValueError(f"batch_size must be 1 with kvpress (it keeps no padding mask), got {kwargs['batch_size']}")
        python = python or os.environ.get("KVPRESS_PYTHON")
        if not python:
            raise ValueError("python: no Python with kvpress 0.5.5 given (model argument python=... or $KVPRESS_PYTHON)")
        kwargs.setdefault("device", default_device())
        super().__init__(pretrained=resolve_pretrained(pretrained), batch_size=1, **kwargs)
        args = dict(model=self.model.name_or_path, press=press, compression_ratio=float(compression_ratio),
                    dtype=str(self.model.dtype).removeprefix("torch."), device=str(self.device),
                    threads=torch.get_num_threads())
        self.worker = subprocess.Popen([python, str(WORKER), json.dumps(args)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        weakref.finalize(self, _stop, self.worker)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        attention_mask: torch.Tensor | None = None, **generation_kwargs: Any) -> torch.Tensor:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the kvpress model takes unpadded prompts only (batch 1): its presses keep no padding mask")
        request = dict(ids=context.tolist(), max_length=max_length, stop=stop, kwargs=generation_kwargs)
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        answer = self.worker.stdout.readline()
        if not answer:
            raise RuntimeError(f"the kvpress worker exited (code {self.worker.wait()}); its error is printed above")
        return torch.tensor(json.loads(answer)["ids"], device=context.device)


def _stop(worker: subprocess.Popen) -> None:
    """Close the worker's input: it ends after the request in hand."""
    worker.stdin.close()
    worker.wait()
