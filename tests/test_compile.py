"""The decode step compiles as one graph: no graph break, no recompile as the generation grows or restarts."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import momentkv
from conftest import left_padded_batch
from momentkv.patches.private_api import compile_on_any_device


def test_compiled_decode_is_one_graph_and_matches_eager(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    pad = torch.zeros(ids.shape[0], 2, dtype=ids.dtype)
    kwargs = dict(input_ids=torch.cat([pad, ids], 1), attention_mask=torch.cat([pad, mask], 1), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                  pad_token_id=0)
    with momentkv.patched(model, budget=8, prompt_bucket=16):
        eager = model.generate(**kwargs)
    torch._dynamo.reset()
    counters.clear()
    with momentkv.patched(model, budget=8, prompt_bucket=16, compile=True), \
            torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(**kwargs)  # 40 decode steps through the compiled step (fullgraph=True)
        assert counters["stats"]["unique_graphs"] == 1
        cache = momentkv.state_of(model).cache
        again = model.generate(**kwargs)  # reset in place, same shapes: nothing recompiles
        assert momentkv.state_of(model).cache is cache
        shorter = model.generate(**{**kwargs, "input_ids": ids, "attention_mask": mask})  # same prompt bucket
        assert counters["stats"]["unique_graphs"] == 1
    with momentkv.patched(model, budget=8, prompt_bucket=16, compile=True), \
            torch._dynamo.config.patch(error_on_recompile=True):
        repatched = model.generate(**kwargs)  # the same configuration again: the compiled step is reused
        assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert torch.equal(compiled, eager) and torch.equal(again, eager) and torch.equal(repatched, eager)
    assert torch.equal(shorter[:, -40:], eager[:, -40:]), "only padding differs: the answers are the same"


@pytest.mark.skipif(torch.__version__ < "2.13", reason="torch 2.11's inductor segfaults compiling this model's decode "
                    "step on CPU (docs/design.md, known limitations); eager is exact there")
def test_a_linear_attention_hybrid_compiles_exactly(tmp_path):
    """Qwen3.5: gated delta-net layers (transformers' own cache layers) between the budgeted full-attention ones;
    the compiled step gives the unpatched model's tokens, nothing evicted."""
    from momentkv.evals.architectures import build, prompts

    model = build("qwen3_5", "Qwen3_5ForCausalLM", tmp_path)
    ids, mask = prompts()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  pad_token_id=0)
    expected = model.generate(**kwargs)
    torch._dynamo.reset()
    counters.clear()
    with momentkv.patched(model, budget=16, compile=True):
        assert torch.equal(model.generate(**kwargs), expected)
    assert not counters["graph_break"]



def test_sliding_layers_and_a_soft_cap_compile(tiny_model):
    """Gemma 2: sliding-window layers kept by transformers' static layer, which counts its length in a Python int
    (a static compile recompiled at every step and hit dynamo's limit, as transformers' own static cache does),
    and a logit soft cap that binds. Compiled, with evictions, it gives eager's tokens in at most two graphs (the
    int turns symbolic after its first change) and keeps them as the generation restarts."""
    model = tiny_model("gemma2")
    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                  pad_token_id=0)
    with momentkv.patched(model, budget=8, prompt_bucket=16):
        eager = model.generate(**kwargs)
    torch._dynamo.reset()
    counters.clear()
    with momentkv.patched(model, budget=8, prompt_bucket=16, compile=True):
        assert torch.equal(model.generate(**kwargs), eager)
        assert counters["stats"]["unique_graphs"] <= 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(model.generate(**kwargs), eager)
    assert not counters["graph_break"]


def test_on_cpu_the_step_is_compiled_into_the_models_graph(tiny_model):
    """Compiled on the CPU, the decode step's reference (the body of its CPU kernel) is traced into the model's
    graph, which inductor fuses: as an opaque op, each call went through torch's dispatcher (~90 us a layer and
    step) and compiled decoding ran no faster than eager (docs/results.md, "Batch 1")."""
    graphs = []

    def recording(graph, example_inputs, **_):
        graphs.append(graph)
        return graph.forward

    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    config = compile_on_any_device(CompileConfig(fullgraph=True, dynamic=False, backend=recording, mode=None))
    with momentkv.patched(model, budget=8, prompt_bucket=16):
        eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                               pad_token_id=0, disable_compile=True)
        torch._dynamo.reset()
        compiled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                  pad_token_id=0, compile_config=config)
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert graphs, "nothing was compiled"
    assert not [target for target in targets if "momentkv" in target]
    assert sum("setitem" in target for target in targets) >= 6, "the step's write is in the graph"
    assert torch.equal(compiled, eager)
