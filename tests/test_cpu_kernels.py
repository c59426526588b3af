"""The fused CPU kernels (the reference bodies compiled by inductor) agree with the reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from momentkv.ops import cpu, kernels
from momentkv.ops import LayerState
from momentkv.ops.signature import by_name, named, positional
from op_states import op_arguments, step_settings
from test_ops import make_state


def fused(name):
    return cpu._fused(by_name(kernels.REFERENCES[name]))


def reference(name):
    return by_name(kernels.REFERENCES[name])


def evict_arguments(tensors, seen=20, recent=1):
    b, h, s = tensors["valid"].shape
    tensors = dict(tensors, positions=torch.arange(s).expand(b, h, s).contiguous(), decode_len=torch.tensor(5),
                   seen=torch.tensor(seen))
    return op_arguments(tensors, budget=3, recent_window=recent)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to the eager body would compare it with itself
def test_fused_cpu_kernels_match_reference(monkeypatch):
    monkeypatch.setenv("MOMENTKV_CPU_KERNEL", "fused")
    st, _ = make_state(hq=4, hkv=2, s=9)
    ref_state = {k: v.clone() for k, v in st.items()}
    out = fused("decode_attention")(*op_arguments(st, scale=0.3))
    expected = reference("decode_attention")(*op_arguments(ref_state, scale=0.3))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st["importance"], ref_state["importance"], rtol=1e-5, atol=1e-6)

    fused("evict")(*evict_arguments(st))
    reference("evict")(*evict_arguments(ref_state))
    for name in ("valid", "n", "mu_k", "mu_v", "comoment"):
        torch.testing.assert_close(st[name], ref_state[name], rtol=1e-5, atol=1e-5)
    assert not torch.equal(st["valid"], make_state(hq=4, hkv=2, s=9)[0]["valid"]), "a slot was evicted"


def test_unknown_kernel_choice_is_refused(monkeypatch):
    monkeypatch.setenv("MOMENTKV_CPU_KERNEL", "triton")
    with pytest.raises(ValueError, match="MOMENTKV_CPU_KERNEL"):
        cpu.register_fused_cpu_kernels()


def test_fused_kernel_serves_many_settings_in_one_process():
    """An eval sweep runs many settings in one process: each gets its own compiled copy, so none
    hits dynamo's recompile cap and falls back to the eager body (with a warning)."""
    kernel = fused("evict")
    limit = torch._dynamo.config.recompile_limit
    for recent in range(limit + 1):
        st, _ = make_state(hq=2, hkv=1, s=6)
        expected = {k: v.clone() for k, v in st.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            kernel(*evict_arguments(st, seen=6, recent=recent))
        reference("evict")(*evict_arguments(expected, seen=6, recent=recent))
        assert torch.equal(st["valid"], expected["valid"]), recent


NO_HITCH = """
import torch, transformers
from torch._dynamo.utils import counters
import momentkv
config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.randint(3, 96, (1, 10))
with momentkv.patched(model, budget=4):
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up: no eviction yet
    before = counters["stats"]["unique_graphs"]
    model.generate(input_ids=ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert momentkv.state_of(model).cache.budgeted_layers[0].state.n.sum() > 0, "nothing was evicted"
print(before, counters["stats"]["unique_graphs"])
"""


def test_the_first_eviction_compiles_nothing():
    """With the fused CPU kernels, a generation that crosses the budget compiles nothing once a two-token warm-up
    (which never evicts) has run: the first eviction costs what every step costs (a user saw a 3-4 s hitch there)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOMENTKV_CPU_KERNEL="fused")
    done = subprocess.run([sys.executable, "-c", NO_HITCH], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = map(int, done.stdout.split()[-2:])
    assert before > 0, "the fused kernels were not compiled at all"
    assert after == before, f"{after - before} compilations once eviction began"


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the fallback to the eager body warns: here it fails
@pytest.mark.parametrize("dtype, layer_scope", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.float32, True)], ids=["fp32", "bf16", "layer-scope"])
def test_the_step_of_the_defaults_compiles_at_a_models_shape(dtype, layer_scope):
    """The defaults' step (moments kept, the window capped) at a real head size compiles into one fused kernel.
    Inductor's C++ outer-loop fusion failed on it (KeyError in codegen) and every step of every default generation
    silently ran the eager body; ``ops/cpu.py`` compiles such a graph again with horizontal fusion off."""
    state = LayerState.allocate(1, 2, 97, 32, 32, dtype, dtype, torch.device("cpu"))
    state.valid[..., :64] = True
    state.evictable[..., 4:] = True
    state.seen.fill_(64)
    state.decode_len.fill_(40)
    settings = step_settings(budget=32, recent_window=64, cap_window=True, moments=True, layer_scope=layer_scope)
    token = torch.randn(1, 2, 1, 32, dtype=dtype)
    values = named(state, settings, query=torch.randn(1, 8, 32, dtype=dtype), key=token, value=token, scale=0.125)
    expected = by_name(kernels.REFERENCES["decode_step"])(*positional(dict(values, **clone_state(values))))
    out = fused("decode_step")(*positional(values))
    torch.testing.assert_close(out, expected)


def clone_state(values):
    return {name: values[name].clone() for name in LayerState.__dataclass_fields__}


def decode_values(batch=1, slots=577, heads=3, groups=3, dim=64):
    """A decode step's arguments at SmolLM2's shapes (a 512-token prompt, budget 64), past the budget."""
    state = LayerState.allocate(batch, heads, slots, dim, dim, torch.float32, torch.float32, torch.device("cpu"))
    state.valid.fill_(True)
    state.evictable[..., 4:] = True
    state.seen.fill_(slots)
    state.decode_len.fill_(65)
    settings = step_settings(budget=64, recent_window=64, cap_window=True, moments=True)
    token = torch.randn(batch, heads, 1, dim)
    return named(state, settings, query=torch.randn(batch, heads * groups, dim), key=token, value=token, scale=0.125)


def test_a_small_step_does_not_wait_on_thread_barriers():
    """At batch 1 the step's loops are too small to share out: each OpenMP worksharing loop ends in a barrier,
    a wait for the other thread's time slice when other processes share the cores (inductor's default split
    14 of them into a step; beside 4 busy processes the step then took 3.7x the full cache's time)."""
    from torch._inductor.utils import run_and_get_cpp_code

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_cpp_code(fused("decode_step"), *positional(decode_values()))
    assert "extern" in code, "no C++ kernel was compiled"
    assert code.count("#pragma omp for") <= 2, code.count("#pragma omp for")


@pytest.mark.parametrize("batch, to_blas", [(1, False), (4, True)])
def test_a_large_compiled_product_leaves_the_query_stored(batch, to_blas):
    """Traced into a model's graph, the step's query arrives as an expression (its rotary embedding: cos and sin of
    the position). Fused into the logits' loop, inductor recomputed it for every slot, counting neither cos nor sin as
    worth storing on CPU (SmolLM2 at batch 64: 416 against 321 ms a compiled step). A product of at least
    ``FUSED_PRODUCT_BELOW`` multiply-adds is a BLAS call, whose query inductor stores; a batch-1 product stays fused."""
    from torch._inductor.utils import run_and_get_code

    values = decode_values(batch=batch)  # the logits' product: batch x 332k multiply-adds
    query = values.pop("query")
    body = kernels.REFERENCES["decode_step"]

    def step(raw: torch.Tensor, position: torch.Tensor, values: dict) -> torch.Tensor:
        angle = position * torch.arange(1, 65, dtype=torch.float32) / 64
        return body(query=raw * angle.cos() + raw.roll(32, -1) * angle.sin(), **values)

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(torch.compile(step, fullgraph=True, dynamic=False), query, torch.tensor(7.0),
                                   values)
    code = "\n".join(code)
    assert ("bmm" in code) == to_blas
    if to_blas:  # the rotary embedding stored once, then read: no kernel evaluates it a second time
        assert code.count(".cos()") == 1, code.count(".cos()")


def test_a_kernel_follows_the_thread_count(monkeypatch):
    """Inductor writes a thread count other than the machine's core count into the C++: a kernel compiled before
    ``torch.set_num_threads`` would keep the old count, so the count is part of what a kernel is compiled for."""
    compiled = []
    original = cpu._compile
    monkeypatch.setattr(cpu, "_compile", lambda *a: compiled.append(1) or original(*a))
    kernel, threads = fused("evict"), torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            st, _ = make_state(hq=2, hkv=1, s=6)
            kernel(*evict_arguments(st, seen=6))
    finally:
        torch.set_num_threads(threads)
    assert len(compiled) == 2


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_bound_step_runs_as_call_does_and_checks_each_calls_layout(monkeypatch):
    """A layer's bound op (``kernels.bind``: its state's layout found once, inductor's own size checks off) gives
    the reference's result at every step; a per-call argument of another layout (a query with other strides) gets
    a kernel of its own, not the one specialised for the first layout (a wrong answer: nothing else checks it)."""
    from test_decode_step import SETTINGS, prompt_state, settings_of, tokens

    monkeypatch.setitem(kernels._KERNELS, ("decode_step", "cpu"), fused("decode_step"))  # tests run the reference
    st, settings = prompt_state(), settings_of(SETTINGS[0])
    expected = st.clone()
    step = kernels.bind("decode_step", st, settings)
    for index, (query, key, value) in enumerate(tokens(st, 4, 8)):
        if index >= 3:  # same values, other strides
            query = query.transpose(0, 1).contiguous().transpose(0, 1)
        out = step(query=query, key=key, value=value, scale=0.35)
        want = kernels.call("decode_step", expected, settings, route="reference", query=query, key=key, value=value,
                            scale=0.35)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(LayerState.__dataclass_fields__, st.tensors(), expected.tensors()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(TypeError, match="not a decode-op parameter: querry"):
        step(querry=query)
