"""What momentkv relies on in transformers' private APIs (patches/private_api.py): a release that changes one
fails here, by name, rather than in a generation."""

from __future__ import annotations

from transformers import CompileConfig, GenerationConfig, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from momentkv.patching import GENERATE_CACHE_ARG
from momentkv.patches.private_api import attention_implementation, compile_on_any_device, unregister


def test_the_attention_implementation_reads_back_what_was_set(tiny_model):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert attention_implementation(model) == "eager"
    model.set_attn_implementation("sdpa")
    assert attention_implementation(model) == "sdpa"


def test_unregister_removes_both_registrations():
    AttentionInterface.register("momentkv_probe", lambda *args, **kwargs: None)
    AttentionMaskInterface.register("momentkv_probe", sdpa_mask)
    assert "momentkv_probe" in ALL_ATTENTION_FUNCTIONS and "momentkv_probe" in ALL_MASK_ATTENTION_FUNCTIONS
    unregister("momentkv_probe")
    assert "momentkv_probe" not in ALL_ATTENTION_FUNCTIONS and "momentkv_probe" not in ALL_MASK_ATTENTION_FUNCTIONS


def test_the_compile_flag_makes_generate_compile_on_cpu(tiny_model):
    model = tiny_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=16)
    plain = GenerationConfig(compile_config=CompileConfig())
    flagged = GenerationConfig(compile_config=compile_on_any_device(CompileConfig()))
    assert model.device.type == "cpu"
    assert not model._valid_auto_compile_criteria({GENERATE_CACHE_ARG: cache}, plain)
    assert model._valid_auto_compile_criteria({GENERATE_CACHE_ARG: cache}, flagged)
