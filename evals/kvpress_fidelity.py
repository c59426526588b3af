"""Teacher-forced fidelity of a kvpress decoding-time press, one prompt at a time.

Runs in kvpress's own environment (kvpress 0.5.5 needs transformers < 5.3): imports only torch,
transformers, kvpress and ``fidelity.py`` beside this file (loaded by path, so momentkv itself is
not imported). kvpress keeps no padding mask through compression, hence batch 1.
Usage: python kvpress_fidelity.py '<json: model, inputs (.pt: prompts, reference, logprobs), press, target_extra>'
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

PRESSES = ("streamingllm", "tova", "keydiff", "knorm")


def _fidelity_module():
    spec = importlib.util.spec_from_file_location("momentkv_fidelity", Path(__file__).with_name("fidelity.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _press(name: str, target_size: int):
    import kvpress

    base = {"streamingllm": lambda: kvpress.StreamingLLMPress(n_sink=4), "tova": kvpress.TOVAPress,
            "keydiff": kvpress.KeyDiffPress, "knorm": kvpress.KnormPress}[name]()
    return kvpress.DecodingPress(base_press=base, compression_interval=1, target_size=target_size)


def main(args: dict) -> dict:
    torch.set_num_threads(args.get("threads", torch.get_num_threads()))
    fidelity = _fidelity_module()
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
    data = torch.load(args["inputs"])
    top1, kl = [], []
    for prompt, reference, logprobs in zip(data["prompts"], data["reference"], data["logprobs"]):
        ids = prompt[None]
        press = _press(args["press"], ids.shape[1] + args["budget"])
        with press(model):
            out = fidelity.stream(model, ids, torch.ones_like(ids), reference[None], logprobs[None])
        top1.append(out.agree.float().mean().item())
        kl.append(out.kl.mean().item())
    return dict(top1_rows=top1, kl_rows=kl)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
