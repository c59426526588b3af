"""Decode with kvpress's decoding-time compression and print timings as JSON.

Runs in kvpress's own environment (kvpress 0.5.5 needs transformers < 5.3): imports only
torch, transformers, kvpress and the dependency-free ``step_timer`` beside this file.
Usage: python kvpress_runner.py '<json: model, prompt_len, new_tokens, batch, target, interval, dtype, device,
sampling (optional: generate's sampling options; greedy without)>'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).parent))
from step_timer import StepTimer, kv_bytes  # noqa: E402


def main(args: dict) -> dict:
    from kvpress import DecodingPress, StreamingLLMPress

    device = torch.device(args["device"])
    dtype = getattr(torch, args["dtype"])
    if args["model"].startswith("random:"):  # random weights of a given shape (speed does not depend on them)
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**json.loads(args["model"][len("random:"):]))).to(dtype).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (args["batch"], args["prompt_len"]), generator=gen).to(device)
    press = DecodingPress(base_press=StreamingLLMPress(n_sink=4), compression_interval=args["interval"],
                          target_size=args["target"])
    timer = StepTimer(device)
    torch.manual_seed(0)
    with press(model):
        out = model.generate(input_ids=ids, max_new_tokens=args["new_tokens"], min_new_tokens=args["new_tokens"],
                             **args.get("sampling", dict(do_sample=False)),
                             stopping_criteria=StoppingCriteriaList([timer]), return_dict_in_generate=True,
                             pad_token_id=0)
    return dict(timer.summary(args["batch"]), kv_bytes=kv_bytes(out.past_key_values))


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
