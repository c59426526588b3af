"""Generate with one of kvpress's prefill presses, for lm-eval requests sent by ``KVPressLM`` (kvpress_lm.py).

Runs in kvpress's own environment (kvpress 0.5.5 needs transformers < 5.3): imports only torch, transformers
and kvpress, never momentkv. The press compresses the whole prompt (the question with it) as ``generate``
prefills it, the way ``with press(model): model.generate(...)`` does in kvpress's README and the way momentkv's
prefill budget does; the answer's tokens are then appended uncompressed. One request per line on stdin
(``{"ids": [[...]], "max_length": n, "stop": [...], "kwargs": {...}}``), one answer per line on stdout
(``{"ids": [[...]]}``, prompt and answer), until stdin closes. Batch 1: kvpress keeps no padding mask.
Usage: python kvpress_generate.py '<json: model, press, compression_ratio, dtype, device, threads>'
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# kvpress's training-free prefill presses that run offline, by name: the press class, wrapped by AdaKV (head-wise
# budgets, alpha_safeguard 0.2) where the name says so. KVzip is not here: it compresses after a context-only
# prefill (kvpress's pipeline), not inside one generate over the whole prompt.
SCORERS = {"expected_attention": "ExpectedAttentionPress", "snapkv": "SnapKVPress", "tova": "TOVAPress",
           "keydiff": "KeyDiffPress", "knorm": "KnormPress", "streamingllm": "StreamingLLMPress",
           "pyramidkv": "PyramidKVPress"}
ADAKV = ("expected_attention", "snapkv")
PRESSES = (*SCORERS, *(f"adakv-{name}" for name in ADAKV))


def make_press(name: str, compression_ratio: float) -> Any:
    """kvpress's press ``name`` at ``compression_ratio``, with its own defaults otherwise."""
    import kvpress

    if name not in PRESSES:
        raise ValueError(f"press: unknown {name!r}; known: {', '.join(PRESSES)}")
    scorer = name.removeprefix("adakv-")
    press = getattr(kvpress, SCORERS[scorer])(compression_ratio=compression_ratio)
    return kvpress.AdaKVPress(press=press) if name != scorer else press


class _LayerTypedRotary(torch.nn.Module):
    """A rotary embedding that needs the layer's type (Gemma 3's: sliding or full), called as one that does not."""

    def __init__(self, rotary: torch.nn.Module, layer_type: str) -> None:
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, layer_type=self.layer_type)


def sliding_layers_kept(press: Any) -> Any:
    """``press`` leaving layers with a sliding window alone: kvpress does so for Gemma 3 in its multimodal class
    (base_press.py) but hooks every layer of the text-only one, whose sliding layers keep a window cache of their
    own. momentkv budgets the full-attention layers only, so both compress the same layers. A press that rotates
    a query itself (ExpectedAttention) calls the model's rotary embedding without the layer's type, which Gemma 3's
    needs: it gets the compressed layer's."""
    hook = press.forward_hook

    def forward_hook(module: Any, args: Any, kwargs: dict, output: Any) -> Any:
        if getattr(module, "is_sliding", False):
            return output
        rotary = getattr(module, "rotary_emb", None)
        if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
            module.rotary_emb = _LayerTypedRotary(rotary, module.config.layer_types[module.layer_idx])
        return hook(module, args, kwargs, output)

    press.forward_hook = forward_hook
    return press


def generate(model: Any, tokenizer: Any, press: Any, request: dict) -> list[list[int]]:
    """One request: greedy generation under ``press``, stopping at lm-eval's stop strings."""
    kwargs = dict(request["kwargs"])
    if kwargs.pop("do_sample", False):
        raise ValueError("kvpress comparison runs greedy decoding only (do_sample=False)")
    kwargs.pop("temperature", None)
    ids = torch.tensor(request["ids"], device=model.device)
    if ids.shape[0] != 1:
        raise ValueError(f"batch must be 1 (kvpress keeps no padding mask), got {ids.shape[0]} rows")
    with torch.no_grad(), press(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_length=request["max_length"],
                             do_sample=False, stop_strings=request["stop"] or None, tokenizer=tokenizer,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out.tolist()


def main(args: dict) -> None:
    torch.set_num_threads(args["threads"])
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=getattr(torch, args["dtype"]))
    model = model.to(args["device"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    press = sliding_layers_kept(make_press(args["press"], args["compression_ratio"]))
    for line in sys.stdin:
        print(json.dumps({"ids": generate(model, tokenizer, press, json.loads(line))}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
