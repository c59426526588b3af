"""A patched model's generate() lifecycle behaves like transformers' own caches, or refuses clearly:
threads, copies, pickling, autocast, inference mode, return sequences, checkpoint cache choices, flags;
and each row of a batch decodes as it does alone, under every policy."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import momentkv
from conftest import left_padded_batch
from momentkv.ops import LayerState, StepSettings, call
from momentkv.ops.scores import SCORE_KINDS


def greedy(model, ids, mask, new_tokens=12, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **kwargs)


def test_threads_sharing_a_patched_model_each_get_their_own_answer(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    prompts = [(ids, mask), (ids[1:], mask[1:]), (ids[:1, -4:], mask[:1, -4:])]
    with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=8):
        expected = [greedy(model, *prompt, 20) for prompt in prompts]
        results: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                results[index] = greedy(model, *prompts[index % 3], 20)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for index, out in results.items():
        assert torch.equal(out, expected[index % 3]), index


def test_deepcopy_generates_with_its_own_weights_and_unpatches_alone(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    momentkv.patch(model, budget=3, recent_window=1, prompt_bucket=8)
    try:
        expected = greedy(model, ids, mask)
        clone = copy.deepcopy(model)
        assert torch.equal(greedy(clone, ids, mask), expected)
        with torch.no_grad():
            clone.lm_head.weight.mul_(-1.0)
        assert not torch.equal(greedy(clone, ids, mask), expected), "the copy generated with the original's weights"
        assert momentkv.state_of(clone).cache is not momentkv.state_of(model).cache
        momentkv.unpatch(clone)
        assert torch.equal(greedy(model, ids, mask), expected), "unpatching the copy changed the original"
        assert model.config._attn_implementation.startswith("momentkv_")
    finally:
        momentkv.unpatch(model)


def test_pickling_or_saving_a_patched_model_is_refused_clearly(tiny_model):
    model = tiny_model("llama")
    with momentkv.patched(model, budget=4):
        with pytest.raises(TypeError, match="cannot be pickled or saved whole"):
            pickle.dumps(model)
        with pytest.raises(TypeError, match="cannot be pickled or saved whole"):
            torch.save(model, io.BytesIO())
        torch.save(model.state_dict(), io.BytesIO())  # the weights alone save as always
    pickle.loads(pickle.dumps(model))  # unpatched, as before


def test_autocast_and_inference_mode_then_plain_calls(tiny_model):
    """A cache made under autocast (bf16 keys) or inference mode (inference tensors) is never reused where it
    does not fit; each call gets a cache of its own dtype and mode."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=8):
        plain = greedy(model, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = greedy(model, ids, mask)
        assert autocast.shape == plain.shape
        assert torch.equal(greedy(model, ids, mask), plain)
        with torch.inference_mode():
            assert torch.equal(greedy(model, ids, mask), plain)
        assert torch.equal(greedy(model, ids, mask), plain)


def test_num_return_sequences_gets_a_cache_of_that_batch(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=8):
        greedy(model, ids, mask)  # a cache of batch 3 exists and would be reused for the same prompt
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                             num_return_sequences=2, pad_token_id=0)
    assert out.shape[0] == 6


def test_a_checkpoint_choosing_a_cache_implementation_generates(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    expected = greedy(model, ids, mask)
    model.generation_config.cache_implementation = "static"
    try:
        with momentkv.patched(model, budget=16, prompt_bucket=8):
            assert torch.equal(greedy(model, ids, mask), expected)
        assert model.generation_config.cache_implementation == "static", "the checkpoint's config was modified"
    finally:
        model.generation_config.cache_implementation = None


@pytest.mark.parametrize("flags, message", [
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
])
def test_flags_that_would_give_less_than_asked_are_refused(tiny_model, flags, message):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match=message):
            greedy(model, ids, mask, **flags)


@pytest.mark.parametrize("option", ["prefill_budget", "prompt_bucket", "observation_window", "sinks", "prefill_window"])
def test_no_option_sizes_anything_beyond_the_models_context(tiny_model, option):
    model = tiny_model("llama")  # context 256
    needs = {"prefill_budget": 64} if option == "prefill_window" else {}
    with pytest.raises(ValueError, match=rf"{option} must be an int in \[\d, 256\]"):
        momentkv.patch(model, budget=8, **{option: 257}, **needs)
    assert not hasattr(model, "_momentkv")


@pytest.mark.parametrize("entry", [momentkv.unpatch, momentkv.state_of])
def test_public_entry_points_check_their_model_type(entry):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        entry(torch.nn.Linear(2, 2))


# Every registered rule but key norm, and the engine's modes on some of them. Key norm ties by nature: the copies
# of a repeated token have one key norm (RoPE keeps norms), so which copy goes is decided by rounding, which
# batching changes (kvpress's rule has the same property); tests/test_policies.py checks it otherwise.
TIE_PRONE = ("keynorm",)
POLICIES = [*(dict(policy=name) for name in momentkv.policy_names() if name not in TIE_PRONE),
            dict(policy="random", seed=5),
            dict(policy="momentum", scope="layer"), dict(policy="keydiff", scope="layer"),
            dict(policy="momentum", protect_prompt=False, sinks=1),
            dict(policy="random", protect_prompt=False, sinks=1, prefill_budget=6),
            dict(policy="keydiff", protect_prompt=False, sinks=1, prefill_budget=6)]


@pytest.mark.parametrize("settings_", POLICIES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_each_row_decodes_as_alone_under_every_policy(tiny_model, settings_):
    """Eviction under way: a row's logits never depend on the other rows or on its own left padding
    (logits, not only tokens: on a tiny model a different eviction seldom changes the argmax)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()

    def logits(ids, mask):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        return out.sequences[:, -30:], torch.stack(out.logits, 1)

    with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=16, **settings_):
        tokens, batch = logits(ids, mask)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone_tokens, alone = logits(ids[row:row + 1, real], mask[row:row + 1, real])
            assert torch.equal(alone_tokens[0], tokens[row]), f"row {row}: tokens differ when batched"
            torch.testing.assert_close(alone[0], batch[row], atol=1e-4, rtol=1e-4, msg=f"row {row} differs batched")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["llama", "qwen2", "gemma3"]),
       options=st.fixed_dictionaries({}, optional={
           "do_sample": st.booleans(), "top_k": st.integers(1, 20), "temperature": st.floats(0.5, 1.5),
           "repetition_penalty": st.floats(1.0, 1.5), "no_repeat_ngram_size": st.integers(2, 3),
           "num_return_sequences": st.integers(1, 2)}),
       method=st.sampled_from([dict(), dict(policy="window"), dict(protect_prompt=False), dict(alpha=1.0),
                               dict(correction="none"), dict(scope="layer", policy="random")]),
       rows=st.sampled_from([(9, 5, 12), (4,), (7, 7)]))
def test_nothing_evicted_equals_the_unpatched_model(tiny_model, arch, options, method, rows):
    model = tiny_model(arch)
    ids, mask = left_padded_batch(rows)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, **options)
    torch.manual_seed(0)
    try:
        expected = model.generate(**kwargs)
    except ValueError as refusal:  # options transformers itself refuses: the patched model refuses them alike
        with momentkv.patched(model, budget=16, prompt_bucket=8, **method), pytest.raises(ValueError):
            model.generate(**kwargs)
        assert "num_return_sequences" in str(refusal)
        return
    with momentkv.patched(model, budget=16, prompt_bucket=8, **method):
        torch.manual_seed(0)
        assert torch.equal(model.generate(**kwargs), expected)


def test_generation_config_of_the_wrong_type_is_refused(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=4):
        with pytest.raises(TypeError, match="generation_config"):
            model.generate(input_ids=ids, attention_mask=mask, generation_config={"max_new_tokens": 2})
    assert isinstance(model.generation_config, transformers.GenerationConfig)


@pytest.mark.parametrize("score_kind", SCORE_KINDS)
def test_eviction_choice_ignores_the_row_index(score_kind):
    """The op itself: the same row at batch index 0 and 1 evicts the same slot, for every seed (the random
    policy once hashed the row index; the model-level test above covers left padding)."""
    gen = torch.Generator().manual_seed(0)
    h, s, d = 2, 12, 8
    for seed in range(8):
        state = LayerState.allocate(2, h, s, d, d, torch.float32, torch.float32, torch.device("cpu"))
        one = dict(keys=torch.randn(1, h, s, d, generator=gen), values=torch.randn(1, h, s, d, generator=gen),
                   importance=torch.rand(1, h, s, generator=gen), normalizer=torch.rand(1, h, s, generator=gen) + 1,
                   positions=torch.randperm(s, generator=gen).expand(1, h, s).clone())
        for name, tensor in one.items():
            getattr(state, name).copy_(torch.cat([tensor, tensor]))
        state.valid.fill_(True)
        state.evictable.fill_(True)
        state.seen.fill_(s)
        state.decode_len.fill_(9)
        rule = StepSettings(alpha=0.9, moments=True, moment_weight=0.0, budget=4, score_kind=score_kind,
                            recent_window=2, cap_window=False, layer_scope=False, seed=seed)
        call("evict", state, rule, route="reference")
        assert torch.equal(state.free_slot[0], state.free_slot[1]), seed


@pytest.mark.parametrize("kwargs", [dict(position_bias=torch.zeros(1, 2, 1, 5)), dict(sliding_window=4), dict()],
                         ids=["position_bias", "sliding_window", "none"])
def test_decode_refuses_keys_not_its_own_and_maths_it_does_not_compute(kwargs):
    """The per-step guard behind patch's trial generation: other tensors than the buffers the layer's cache
    returned for the new token (or no new token), or an argument that changes a full-attention layer's maths,
    raise before any output."""
    from momentkv.patches.attention import UnsupportedAttention, _check_decode_call

    own = (torch.zeros(1), torch.zeros(1))
    layer = type("Layer", (), dict(keys=own[0], values=own[1], unattended=True))()
    module = type("Attention", (), dict(layer_idx=3))()
    if kwargs:
        with pytest.raises(UnsupportedAttention, match=f"layer 3 .*uses {next(iter(kwargs))} "):
            _check_decode_call(layer, module, *own, kwargs)
        return
    _check_decode_call(layer, module, *own, kwargs)
    with pytest.raises(UnsupportedAttention, match="other than the cache's own"):
        _check_decode_call(layer, module, own[0].clone(), own[1], kwargs)  # transformed after the cache
    layer.unattended = False  # the token was attended already: attention called twice per layer
    with pytest.raises(UnsupportedAttention, match="other than the cache's own"):
        _check_decode_call(layer, module, *own, kwargs)


def test_a_token_that_never_reaches_the_attention_is_refused_not_lost(tiny_model):
    """A model that updated a budgeted layer's cache but attended elsewhere would write tokens that are never
    attended nor evicted, and decode over a cache past its budget. The next update says so, and a new
    generation (which resets the cache) starts clean."""
    from momentkv.patches.support import UnsupportedAttention

    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with momentkv.patched(model, budget=4):
        first = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = momentkv.state_of(model).cache
        layer = cache.budgeted_layers[0]
        token = torch.zeros(1, layer.num_heads, 1, layer.keys.shape[-1])
        with cache.generating():
            layer.update(token, token)  # received, never attended
            with pytest.raises(UnsupportedAttention, match="never reached momentkv's attention"):
                layer.update(token, token)
        again = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(first, again)
