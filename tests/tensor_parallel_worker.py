"""Run under ``torchrun --nproc_per_node 2`` by tests/test_tensor_parallel.py: each tiny model loaded with
``tp_plan="auto"`` (gloo, CPU) against the same model in one process, with momentkv; writes rank<r>.json."""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

import momentkv
from momentkv.evals.models import tensor_parallel_loading

CASES = {  # name -> momentkv options
    "covering": dict(budget=64),
    "evicting": dict(budget=4, protect_prompt=False, sinks=1, recent_window=2),
    "prefill-vote": dict(budget=4, prefill_budget=8, sinks=1, recent_window=2, prompt_bucket=4),
    "prefill-alone": dict(budget=4, prefill_budget=8, sinks=1, recent_window=2, prompt_bucket=4, prefill_vote=0.0),
    "layer-scope": dict(budget=4, protect_prompt=False, sinks=1, recent_window=2, scope="layer"),
    "layer-scope-compiled": dict(budget=4, protect_prompt=False, sinks=1, recent_window=2, scope="layer",
                                 compile=True),
}


SHARDED = tensor_parallel_loading()
# torch 2.11's inductor segfaults compiling a Qwen3.5 decode step on CPU (tests/test_compile.py says the same).
NOT_ON_THIS_TORCH = {("qwen3_5-hybrid", "layer-scope-compiled")} if torch.__version__ < "2.13" else set()


def generate(model, ids, mask, **options):
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                  pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    if not options:
        out = model.generate(**kwargs)
    else:
        with momentkv.patched(model, **options):
            out = model.generate(**kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def refusal(folder: str, model_class: str) -> str:
    """What patching says to a model whose KV heads the ranks cannot share equally."""
    model = getattr(transformers, model_class).from_pretrained(folder, dtype=torch.float32, **SHARDED).eval()
    try:
        momentkv.patch(model, budget=4)
    except ValueError as error:
        return str(error)
    return "accepted"


def main(folders: dict[str, str], out: str) -> None:
    rank = int(os.environ["RANK"])
    uneven = folders.pop("uneven")
    ids = torch.tensor([[0, 0, 0, 5, 9, 13, 17, 21, 25, 29, 33, 37], [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]])
    mask = (torch.arange(12)[None] >= torch.tensor([[3], [0]])).long()
    results = {}
    for name, (folder, model_class) in folders.items():
        cls = getattr(transformers, model_class)
        sharded = cls.from_pretrained(folder, dtype=torch.float32, **SHARDED).eval()
        alone = cls.from_pretrained(folder, dtype=torch.float32).eval()
        unpatched, _ = generate(alone, ids, mask)
        row = {}
        for case, options in CASES.items():
            if (name, case) in NOT_ON_THIS_TORCH:
                row[case] = dict(skipped="torch 2.11's inductor segfaults compiling this model's decode step on CPU")
                continue
            tokens, logits = generate(sharded, ids, mask, **options)
            reference, reference_logits = generate(alone, ids, mask, **options)
            row[case] = dict(tokens_equal_one_process=bool(torch.equal(tokens, reference)),
                             tokens_equal_unpatched=bool(torch.equal(tokens, unpatched)),
                             max_logit_difference=(logits - reference_logits).abs().max().item(),
                             tokens=tokens.tolist())
        with momentkv.patched(sharded, budget=4):
            sharded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
            row["kv_heads_per_rank"] = momentkv.state_of(sharded).cache.budgeted_layers[0].state.keys.shape[1]
            row["ranks"] = momentkv.state_of(sharded).heads.size
        results[name] = row
    results["uneven"] = refusal(*uneven)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2])
    torch.distributed.barrier()  # leave together: a rank exiting with the group alive can abort its peer
    torch.distributed.destroy_process_group()
