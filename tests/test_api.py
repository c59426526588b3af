"""The public API: patch, unpatch, the context manager, and clear errors."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
import transformers

import momentkv
from conftest import left_padded_batch


def test_import_changes_nothing_in_transformers():
    code = (
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "before = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))\n"
        "import momentkv\n"
        "after = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))\n"
        "assert before == after, (before, after)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unpatch_restores_the_model_exactly(tiny_model):
    model = tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    attention, generate = model.config._attn_implementation, model.generate
    assert momentkv.patch(model, budget=4) is model
    assert model.config._attn_implementation.startswith("momentkv_")
    name = model.config._attn_implementation
    assert momentkv.unpatch(model) is model
    assert model.config._attn_implementation == attention
    assert model.generate == generate and "generate" not in vars(model)
    assert not hasattr(model, "_momentkv")
    assert name not in transformers.AttentionInterface._global_mapping
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_two_patched_models_share_no_state(tiny_model):
    first, second = tiny_model("llama"), tiny_model("qwen2")
    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected_second = second.generate(**kwargs)
    momentkv.patch(first, budget=2, recent_window=1, correction="none")
    momentkv.patch(second, budget=64)
    try:
        first.generate(**kwargs)
        assert torch.equal(second.generate(**kwargs), expected_second)
        assert momentkv.state_of(first).cache is not momentkv.state_of(second).cache
        assert first.config._attn_implementation != second.config._attn_implementation
    finally:
        momentkv.unpatch(first)
        momentkv.unpatch(second)


def test_forward_outside_generate_is_the_unpatched_model(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    with momentkv.patched(model, budget=4):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)


# Models still outside the interface in every supported transformers (GPT-J and CodeGen joined it in 5.24).
@pytest.mark.parametrize("config_name, model_name", [("MptConfig", "MptForCausalLM"), ("BloomConfig", "BloomForCausalLM")])
def test_models_outside_the_attention_interface_are_refused(config_name, model_name):
    config = getattr(transformers, config_name)(vocab_size=64, hidden_size=32, n_embd=32, d_model=32, n_layer=1,
                                                num_hidden_layers=1, n_layers=1, n_head=2, n_heads=2,
                                                num_attention_heads=2, n_positions=64, max_seq_len=64)
    model = getattr(transformers, model_name)(config)
    with pytest.raises(ValueError, match=repr(config.model_type)):
        momentkv.patch(model, budget=8)


def test_a_configuration_without_attention_layers_is_refused_for_that():
    """Bamba's default config is all mamba layers: its attention would dispatch through the interface, but none is
    built. Refused for that, not (falsely) for attention outside the interface."""
    config = transformers.BambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16,
                                      mamba_d_state=8, mamba_n_groups=1)
    with pytest.raises(ValueError, match="'bamba': this configuration builds no attention layer"):
        momentkv.patch(transformers.BambaForCausalLM(config), budget=8)


def test_a_mask_carrying_a_bias_is_refused():
    """Falcon with ALiBi adds the bias to the attention mask, which the budgeted decode step does not read: refused
    at patch (before this check, prompt keys read as padding and the answer was silently wrong)."""
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       alibi=True)
    model = transformers.FalconForCausalLM(config).eval()
    with pytest.raises(ValueError, match="'falcon'") as refused:
        momentkv.patch(model, budget=8)
    assert momentkv.state_of(model) is None
    source = inspect.getsource(transformers.models.falcon.modeling_falcon.FalconAttention.forward)
    dispatches = "ALL_ATTENTION_FUNCTIONS" in source  # 5.25's Falcon does; 5.17's has its own attention
    assert ("mask carries a bias" if dispatches else "does not go through") in str(refused.value)


def test_patch_errors_are_clear(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="budget"):
        momentkv.patch(model)
    with pytest.raises(ValueError, match="budget"):
        momentkv.patch(model, budget=0)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        momentkv.patch(torch.nn.Linear(2, 2), budget=8)
    with pytest.raises(ValueError, match="not patched"):
        momentkv.unpatch(model)
    assert momentkv.state_of(model) is None, "state_of answers 'is it patched?' without an exception"
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match="already patched"):
            momentkv.patch(model, budget=8)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match="meta device"):
        momentkv.patch(meta, budget=8)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_beams": 2}, "num_beams"),
    ({"use_cache": False}, "use_cache"),
    ({"cache_implementation": "static"}, "cache_implementation"),
    ({"prompt_lookup_num_tokens": 3}, "prompt_lookup"),
    ({"past_key_values": transformers.DynamicCache()}, "past_key_values"),
    ({"cache": transformers.DynamicCache()}, "do not pass cache"),
])
def test_unsupported_generation_modes_are_refused(tiny_model, kwargs, words):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match=words):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **kwargs)
        with pytest.raises(ValueError, match="empty"):
            model.generate(input_ids=ids[:, :0], max_new_tokens=4, pad_token_id=0)


def test_new_batch_size_or_longer_prompt_gets_a_new_cache(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=8, prompt_bucket=16):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
        first = momentkv.state_of(model).cache
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=3, pad_token_id=0)
        assert momentkv.state_of(model).cache is not first
        long_ids = torch.randint(3, 90, (2, 20))
        model.generate(input_ids=long_ids, max_new_tokens=3, pad_token_id=0)
        assert momentkv.state_of(model).cache.prompt_slots == 32
