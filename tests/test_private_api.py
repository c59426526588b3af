"""What momentkv relies on in transformers' private APIs (patches/private_api.py): a release that changes one
fails here, by name, rather than in a generation."""

from __future__ import annotations

from transformers import CompileConfig, GenerationConfig, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from momentkv.patching import GENERATE_CACHE_ARG
from momentkv.patches.private_api import attention_parts, compile_on_any_device, unregister


def test_the_attention_implementation_reads_back_what_was_set(tiny_model):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert attention_parts(model) == {"": "eager"}
    model.set_attn_implementation({"": "sdpa"})
    assert attention_parts(model) == {"": "sdpa"}


def test_each_parts_attention_reads_back_and_sets_back_alone():
    """A vision-language model's parts: what ``attention_parts`` reads, ``set_attn_implementation`` restores, and a
    one-part dict sets that part alone."""
    import transformers

    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=90, boi_token_index=91,
        eoi_token_index=92, attn_implementation={"text_config": "sdpa", "vision_config": "eager"}))
    before = attention_parts(model)
    assert before == {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    model.set_attn_implementation({"text_config": "eager"})
    assert attention_parts(model) == {"": "sdpa", "text_config": "eager", "vision_config": "eager"}
    model.set_attn_implementation(before)
    assert attention_parts(model) == before


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
