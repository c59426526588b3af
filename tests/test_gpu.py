"""GPU-only checks (skipped without CUDA): CUDA-graph capture of the whole decode step.

The Triton kernels' comparisons with the reference run natively on CUDA in test_triton.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

import momentkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_llama(dtype):
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


class MemoryProbe(StoppingCriteria):
    def __init__(self):
        self.allocated: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.allocated.append(torch.cuda.memory_allocated())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_reduce_overhead_matches_eager():
    model = small_llama(torch.float32)
    ids = torch.randint(3, 512, (2, 40), device="cuda")
    kwargs = dict(input_ids=ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    with momentkv.patched(model, budget=16, compile=False):
        eager = model.generate(**kwargs)
    with momentkv.patched(model, budget=16, compile=True):  # mode="reduce-overhead", fullgraph=True on CUDA
        compiled = model.generate(**kwargs)
    assert torch.equal(compiled, eager)


def test_cuda_graph_captured_once_and_memory_flat(monkeypatch):
    from torch._inductor import cudagraph_trees

    recordings = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        recordings.append(1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
    model = small_llama(torch.bfloat16)
    ids = torch.randint(3, 512, (1, 100), device="cuda")
    torch._dynamo.reset()
    counters.clear()
    probe = MemoryProbe()
    with momentkv.patched(model, budget=256, compile=True):
        model.generate(input_ids=ids, max_new_tokens=2048, min_new_tokens=2048, do_sample=False, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([probe]))
    assert len(recordings) == 1, f"the decode graph was recorded {len(recordings)} times"
    assert counters["inductor"]["cudagraph_skips"] == 0
    growth = probe.allocated[-1] - probe.allocated[1]
    # Only the generated ids grow (8 bytes a token); a full cache would grow by 1 KiB a token (2 MiB here).
    assert growth < 64 * 1024, f"allocated memory grew by {growth} bytes over 2,048 tokens"
