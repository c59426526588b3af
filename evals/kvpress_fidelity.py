"""Teacher-forced fidelity of a kvpress press, one prompt at a time: its decoding press (at a decode budget), or
one of its prefill presses (at a compression ratio; kvpress_generate.py) compressing the prompt once.

``main`` runs in kvpress's own environment (kvpress 0.5.5 needs transformers < 5.3): this file imports
only torch, transformers, kvpress and ``fidelity.py`` and ``kvpress_generate.py`` beside it (loaded by path, so
momentkv itself is not imported); ``kvpress_rows`` is the caller's side, run from momentkv's environment.
kvpress keeps no padding mask through compression, hence batch 1.
``streamingllm-ordered`` is StreamingLLMPress with the kept slots put back in time order: kvpress
0.5.5 keeps the top-k slots in score order (NVIDIA/kvpress#173), so under DecodingPress the slots
its next compression treats as sinks and as oldest are no longer the first and the oldest tokens.
Usage: python kvpress_fidelity.py '<json: model, inputs (.pt: prompts, reference, logprobs), press, budget, ratio,
threads>'
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

def _beside(name: str):
    """The module ``name``.py beside this file, loaded by path (not through momentkv's package)."""
    spec = importlib.util.spec_from_file_location(f"momentkv_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Decoding presses: every scorer kvpress_generate.py names (AdaKV's wrappers included) inside DecodingPress, and
# StreamingLLM with its slots in time order. But SnapKV and PyramidKV: they score by the attention of the last 64
# queries, and DecodingPress hands them its buffer of recent hidden states, one at the first step (kvpress 0.5.5
# asserts "Query length 1 should be greater than the window size 64").
GENERATE = _beside("kvpress_generate")
QUERY_WINDOW = ("snapkv", "pyramidkv")
PRESSES = (*(p for p in GENERATE.PRESSES if p.removeprefix("adakv-") not in QUERY_WINDOW), "streamingllm-ordered")


def _time_ordered_streamingllm():
    import kvpress
    from kvpress.utils import compute_n_kept

    class TimeOrderedStreamingLLMPress(kvpress.StreamingLLMPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if self.compression_ratio == 0:
                return keys, values
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            kept = scores.topk(compute_n_kept(keys.shape[2], self.compression_ratio), dim=-1).indices.sort(-1).values
            kept = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
            return keys.gather(2, kept).contiguous(), values.gather(2, kept).contiguous()

    return TimeOrderedStreamingLLMPress(n_sink=4)


def _press(name: str, target_size: int):
    """kvpress's decoding press around the scorer ``name``, compressing back to ``target_size`` every step."""
    import kvpress

    base = (_time_ordered_streamingllm() if name == "streamingllm-ordered"
            else GENERATE.make_press(name, 0.0))
    return kvpress.DecodingPress(base_press=base, compression_interval=1, target_size=target_size)


def main(args: dict) -> dict:
    torch.set_num_threads(args.get("threads", torch.get_num_threads()))
    fidelity = _beside("fidelity")
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
    data = torch.load(args["inputs"])
    top1, kl = [], []
    for prompt, reference, logprobs, top in zip(data["prompts"], data["reference"], data["logprobs"], data["top"]):
        ids = prompt[None]
        press = (_press(args["press"], ids.shape[1] + args["budget"]) if args.get("ratio") is None
                 else GENERATE.make_press(args["press"], args["ratio"]))
        press = GENERATE.sliding_layers_kept(press)
        with press(model):
            out = fidelity.stream(model, ids, torch.ones_like(ids), reference[None], logprobs[None])
        top1.append((out.predicted[0] == top).float().mean().item())
        kl.append(out.kl.mean().item())
    return dict(top1_rows=top1, kl_rows=kl)


def kvpress_rows(python: str, model: str, press: str, budget: int, prompts: list[torch.Tensor],
                 reference: torch.Tensor, logprobs: torch.Tensor, top: torch.Tensor,
                 ratio: float | None = None) -> dict[str, list[float]]:
    """Per-prompt top-1 agreement (with the full cache's most likely tokens ``top``) and KL of ``press`` at
    ``budget`` decode slots beyond each prompt (or, given ``ratio``, of the prefill press compressing each prompt at
    that ratio, nothing evicted after), run by ``python`` (an environment with kvpress 0.5.5) along the full-cache
    ``reference`` tokens."""
    known = PRESSES if ratio is None else GENERATE.PRESSES
    if press not in known:
        raise ValueError(f"press: unknown {press!r}{'' if ratio is None else ' prefill press'}; known: {', '.join(known)}")
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs.pt"
        torch.save(dict(prompts=prompts, reference=reference, logprobs=logprobs, top=top), inputs)
        args = dict(model=model, inputs=str(inputs), press=press, budget=budget, ratio=ratio,
                    threads=torch.get_num_threads())
        run = subprocess.run([python, __file__, json.dumps(args)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"kvpress run failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
