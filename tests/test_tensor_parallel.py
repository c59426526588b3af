"""Tensor parallelism through transformers (``tp_plan="auto"``, torchrun, 2 CPU processes, gloo): every rank
keeps exactly the tokens one process keeps, with and without eviction, where the prefill vote and a
layer-scope victim combine heads that the ranks hold apart (eager and compiled)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available()
                                or shutil.which("torchrun") is None, reason="needs torch.distributed with gloo")

MODELS = {  # name -> (config class, model class, options): 4 KV heads, 2 per rank
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=8, num_key_value_heads=4)),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4)),
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=8, num_key_value_heads=4)),
    # a hybrid: gated delta-net layers (sharded by transformers' plan, their state kept by its cache) around a
    # budgeted full-attention layer
    "qwen3_5-hybrid": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        num_attention_heads=8, num_key_value_heads=4, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"])),
}
UNEVEN = dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)  # 3 KV heads cannot be split over 2 ranks


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    folders = {}
    for name, (config_name, model_name, options) in {**MODELS, "uneven": ("LlamaConfig", "LlamaForCausalLM",
                                                                           UNEVEN)}.items():
        config = getattr(transformers, config_name)(**{
            **dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=256,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2), **options})
        torch.manual_seed(0)
        getattr(transformers, model_name)(config).save_pretrained(root / name)
        folders[name] = (str(root / name), model_name)
    return folders


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", *args],  # a free port
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def ranks(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    worker = Path(__file__).with_name("tensor_parallel_worker.py")
    torchrun(str(worker), json.dumps(folders), str(root))
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("model", MODELS)
def test_each_rank_holds_half_the_heads(ranks, model):
    assert all(rank[model]["ranks"] == 2 and rank[model]["kv_heads_per_rank"] == 2 for rank in ranks)


@pytest.mark.parametrize("case", ["covering", "evicting", "prefill-vote", "prefill-alone", "layer-scope",
                                  "layer-scope-compiled"])
@pytest.mark.parametrize("model", MODELS)
def test_sharded_tokens_and_logits_equal_one_process(ranks, model, case):
    for rank in ranks:
        row = rank[model][case]
        if "skipped" in row:
            pytest.skip(row["skipped"])
        assert row["tokens_equal_one_process"], (model, case, row)
        assert row["max_logit_difference"] < 1e-4, (model, case, row)
    assert ranks[0][model][case]["tokens"] == ranks[1][model][case]["tokens"]
    if case == "covering":
        assert ranks[0][model][case]["tokens_equal_unpatched"]


def test_kv_heads_the_ranks_cannot_share_equally_are_refused_at_patch(ranks):
    assert all("3 KV heads sharded over 2 tensor-parallel ranks" in rank["uneven"] for rank in ranks)


def test_bench_under_torchrun_reports_each_ranks_share(folders, tmp_path):
    """`momentkv bench` under torchrun shards the model by heads and reports every rank's memory: each holds
    half of what one process holds (and its own two int64 counters per layer)."""
    args = ["--model", folders["llama-gqa"][0], "--prompt-len", "8", "--lengths", "6", "--budgets", "4",
            "--systems", "full-dynamic,momentkv-eager", "--repeats", "1"]
    done = torchrun("-m", "momentkv.cli", "bench", *args, "--out", str(tmp_path / "tp.json"))
    alone = subprocess.run([sys.executable, "-m", "momentkv.cli", "bench", *args, "--out", str(tmp_path / "one.json")],
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    sharded, one = (json.loads((tmp_path / name).read_text()) for name in ("tp.json", "one.json"))
    assert sharded["world_size"] == 2 and len(sharded["per_rank"]) == 2 and "rank 1:" in done.stdout
    whole = next(r["cache_bytes"] for r in one["rows"] if r["system"] == "momentkv-eager")
    for rows in sharded["per_rank"]:
        share = next(r["cache_bytes"] for r in rows if r["system"] == "momentkv-eager")
        assert share * 2 == whole + 2 * 8 * 3  # 3 layers
