"""A layer's decode step, ``momentkv::decode_step`` (write, attend, evict in one op): the write against a
slot-by-slot statement of the rule, and the step's kernels (fused CPU, Triton under the interpreter) against that
write and the reference ops called one after the other, over generations that cross the budget."""

from __future__ import annotations

import warnings

import pytest
import torch

from momentkv.ops import cpu
from momentkv.ops.attention import decode_attention_reference
from momentkv.ops.eviction import evict_reference
from momentkv.ops.scores import HASH, NORMALIZED, POSITION
from momentkv.ops.signature import by_name, named, positional
from momentkv.ops.state import LayerState
from momentkv.ops.step import compose_step, decode_step_reference, write_reference
from op_states import step_settings

PROMPT, BUDGET = 5, 4


def prompt_state(b=2, h=2, d=8, dv=8, protect=True, seed=0) -> LayerState:
    """A layer right after its prompt: ``PROMPT`` valid slots (the first one invalid in sequence 1: padding)."""
    gen = torch.Generator().manual_seed(seed)
    st = LayerState.allocate(b, h, PROMPT + BUDGET + 1, d, dv, torch.float32, torch.float32, torch.device("cpu"))
    st.keys[:, :, :PROMPT] = torch.randn(b, h, PROMPT, d, generator=gen)
    st.values[:, :, :PROMPT] = torch.randn(b, h, PROMPT, dv, generator=gen)
    st.valid[:, :, :PROMPT] = True
    st.valid[1, :, 0] = False
    st.importance[:, :, :PROMPT] = torch.rand(b, h, PROMPT, generator=gen)
    st.normalizer[:, :, :PROMPT] = 1.0 + torch.rand(b, h, PROMPT, generator=gen)
    st.positions[:, :, :PROMPT] = torch.arange(PROMPT)
    st.evictable[:, :, :PROMPT] = st.valid[:, :, :PROMPT] & (not protect)
    st.evictable[:, :, PROMPT:] = True
    st.seen.fill_(PROMPT)
    return st


def tokens(st: LayerState, hq: int, steps: int, seed=1):
    gen = torch.Generator().manual_seed(seed)
    b, h, _, d = st.keys.shape
    for _ in range(steps):
        yield (torch.randn(b, hq, d, generator=gen), torch.randn(b, h, 1, d, generator=gen),
               torch.randn(b, h, 1, st.values.shape[-1], generator=gen))


def write_slot_by_slot(st: LayerState, key, value) -> None:
    """The write rule, stated per sequence and head: the next decode slot while the region has room, then the
    slot the last eviction freed; valid, score zero, position = tokens seen."""
    b, h = st.free_slot.shape
    for i in range(b):
        for j in range(h):
            used = int(st.decode_len)
            slot = PROMPT + used if used <= BUDGET else int(st.free_slot[i, j])
            st.keys[i, j, slot], st.values[i, j, slot] = key[i, j, 0], value[i, j, 0]
            st.valid[i, j, slot], st.importance[i, j, slot], st.normalizer[i, j, slot] = True, 0.0, 0.0
            st.positions[i, j, slot] = st.seen
    st.seen += 1
    st.decode_len += 1


SETTINGS = [
    dict(score_kind=NORMALIZED, layer_scope=False, moments=True, moment_weight=0.0, sinks=False, protect=True),
    dict(score_kind=NORMALIZED, layer_scope=True, moments=True, moment_weight=1.0, sinks=True, protect=False),
    dict(score_kind=POSITION, layer_scope=False, moments=True, moment_weight=0.0, sinks=False, protect=False),
    dict(score_kind=HASH, layer_scope=False, moments=False, moment_weight=0.0, sinks=False, protect=True),
]


def settings_of(setting):
    return step_settings(alpha=0.9, budget=BUDGET, recent_window=2, cap_window=True, seed=7,
                         **{k: v for k, v in setting.items() if k not in ("sinks", "protect")})


def step_arguments(st: LayerState, query, setting, hq, **per_call):
    """The decode ops' positional arguments for this setting (the same for the write and the step)."""
    sinks = torch.linspace(-1.0, 1.0, hq) if setting["sinks"] else None
    return positional(named(st, settings_of(setting), **{"query": query, "scale": 0.35, "sink_logits": sinks,
                                                          **per_call}))


def one_op_at_a_time(st: LayerState, query, key, value, setting, hq):
    """The step as the three parts: the write as stated above, then the reference ops."""
    write_slot_by_slot(st, key, value)
    parameters = named(st, settings_of(setting), query=query, scale=0.35,
                       sink_logits=torch.linspace(-1.0, 1.0, hq) if setting["sinks"] else None)
    out = decode_attention_reference(**parameters)
    evict_reference(**parameters)
    return out


def assert_same_generation(step, setting, hq=4, steps=BUDGET + 6, tolerance=1e-5):
    """``step`` (a kernel of the whole step, taking the positional arguments) against :func:`one_op_at_a_time`."""
    st = prompt_state(protect=setting["protect"])
    expected = st.clone()
    for query, key, value in tokens(st, hq, steps):
        out = step(*step_arguments(st, query, setting, hq, key=key, value=value))
        torch.testing.assert_close(out, one_op_at_a_time(expected, query, key, value, setting, hq),
                                   rtol=tolerance, atol=tolerance)
    for name, got, want in zip(LayerState.__dataclass_fields__, st.tensors(), expected.tensors()):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)
    assert expected.n.sum() > 0 or not setting["moments"], "the generation crossed the budget"
    assert int(expected.decode_len) == steps


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_reference_step_is_the_write_then_the_ops(setting):
    assert_same_generation(by_name(decode_step_reference), setting)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to the eager body would compare it with itself
@pytest.mark.parametrize("setting", SETTINGS[:2], ids=["head", "layer-sinks-moment-aware"])
def test_fused_cpu_step_matches_the_reference(setting):
    assert_same_generation(cpu._fused(by_name(decode_step_reference)), setting)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_the_write_alone_is_the_rule_stated_slot_by_slot(fused):
    """``momentkv::write`` alone (the step split around a registered rule or a collective), past the budget too,
    each step's freed slot drawn at random per sequence and head."""
    write = cpu._fused(by_name(write_reference)) if fused else by_name(write_reference)
    st = prompt_state()
    expected = st.clone()
    gen = torch.Generator().manual_seed(3)
    for query, key, value in tokens(st, 4, BUDGET + 4):
        freed = torch.randint(0, PROMPT + BUDGET + 1, st.free_slot.shape, generator=gen)
        st.free_slot.copy_(freed)
        expected.free_slot.copy_(freed)
        write(*step_arguments(st, query, SETTINGS[0], 4, key=key, value=value))
        write_slot_by_slot(expected, key, value)
    for name, got, want in zip(LayerState.__dataclass_fields__, st.tensors(), expected.tensors()):
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_fused_kernel_recompiles_for_a_new_layout_mode_or_setting():
    """After the first call the fused kernel skips dynamo's guards, so it checks what they would: a query with
    other strides, inference mode and another scale each get their own compiled graph, not a wrong answer or a
    crash in a kernel specialised for the first."""
    kernel = cpu._fused(by_name(decode_step_reference))
    setting = SETTINGS[0]
    st = prompt_state()
    expected = st.clone()
    for index, (query, key, value) in enumerate(tokens(st, 4, 4)):
        if index == 1:
            query = query.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
        args = step_arguments(st, query, setting, 4, key=key, value=value, scale=0.2 if index == 3 else 0.35)
        with torch.inference_mode(index == 2):
            out = kernel(*args)
        if index != 3:
            torch.testing.assert_close(out, one_op_at_a_time(expected, query, key, value, setting, 4), rtol=1e-5,
                                       atol=1e-5)
    want = by_name(decode_step_reference)(*step_arguments(expected, query, setting, 4, key=key, value=value, scale=0.2))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_opcheck_decode_step():
    st = prompt_state()
    query, key, value = next(tokens(st, 4, 1))
    for setting in SETTINGS[:2]:
        copy = st.clone()
        torch.library.opcheck(torch.ops.momentkv.write.default,
                              step_arguments(copy, query, setting, 4, key=key, value=value))
        torch.library.opcheck(torch.ops.momentkv.decode_step.default,
                              step_arguments(copy, query, setting, 4, key=key, value=value))


def test_triton_step_matches_the_reference():
    """The CUDA kernel of the step (the Triton attention and eviction joined), under the interpreter on CPU."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from momentkv.ops.triton_decode_attention import decode_attention_triton
    from momentkv.ops.triton_evict import evict_triton

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = by_name(compose_step(decode_attention_triton, evict_triton))
    st = prompt_state(d=16, dv=16)
    expected = st.clone()
    setting = SETTINGS[1]
    for query, key, value in tokens(st, 4, BUDGET + 4):
        out = kernel(*step_arguments(st, query, setting, 4, key=key, value=value))
        torch.testing.assert_close(out, one_op_at_a_time(expected, query, key, value, setting, 4), rtol=2e-5,
                                   atol=2e-5)
    torch.testing.assert_close(st.valid, expected.valid)
    torch.testing.assert_close(st.comoment, expected.comoment, rtol=1e-4, atol=1e-4)


def test_the_arguments_trace_in_one_graph():
    """Naming the op's arguments traces under ``fullgraph=True`` on every supported torch (2.11's dynamo could not
    subtract a frozenset from a dict's keys: every compiled decode step failed there)."""
    st, settings = prompt_state(), settings_of(SETTINGS[0])
    traced = torch.compile(lambda key: named(st, settings, key=key)["key"] + 1, fullgraph=True, backend="eager")
    key = torch.randn(2, 2, 1, 8)
    assert torch.equal(traced(key), key + 1)
