"""Every way a user reaches a patched model's generation, and momentkv's public objects, used as transformers' own
are: each path is exact or refused with a clear error (issue 36's probe; docs/bad-inputs.md)."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from transformers import GenerationConfig

import momentkv
from conftest import SMALL, left_padded_batch


def greedy(model, ids, mask, new_tokens=12, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **kwargs)


def scores(model, ids, mask, new_tokens=12, **kwargs):
    out = greedy(model, ids, mask, new_tokens, output_scores=True, return_dict_in_generate=True, **kwargs)
    return torch.stack(out.scores)


@pytest.mark.parametrize("first", ["bf16-model", "autocast"])
def test_a_cache_is_not_reused_across_a_change_of_compute_dtype(tiny_model, first):
    """bf16 weights and autocast over fp32 weights both compute in bf16, but their keys differ in dtype (RoPE
    promotes autocast's keys to fp32): the second call must get a cache of its own, as a fresh patch would."""
    model = tiny_model("llama").to(torch.bfloat16).to(torch.float32)  # weights that survive the casts below
    ids, mask = left_padded_batch()

    def run(how):
        if how == "bf16-model":
            model.to(torch.bfloat16)
            try:
                return scores(model, ids, mask).float()
            finally:
                model.to(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return scores(model, ids, mask).float()

    second = "autocast" if first == "bf16-model" else "bf16-model"
    with momentkv.patched(model, budget=4, recent_window=1, prompt_bucket=8):
        expected = run(second)
    with momentkv.patched(model, budget=4, recent_window=1, prompt_bucket=8):
        run(first)
        assert torch.equal(run(second), expected)


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
def test_a_momentkv_cache_in_a_hand_written_forward_loop_is_refused(tiny_model, patched):
    """A MomentKVCache is filled and read by the decode step of a patched model's generate; a forward loop of
    one's own over it would attend to the new token alone. Refused at its first use, before any output."""
    model = tiny_model("llama")
    ids, _ = left_padded_batch(lengths=(6,))
    cache = momentkv.MomentKVCache(model.config, momentkv.MomentKVConfig(budget=4), prompt_slots=8)
    if patched:
        momentkv.patch(model, budget=4)
    with pytest.raises(ValueError, match="only inside generate"):
        model(input_ids=ids, past_key_values=cache)


def test_the_cache_generate_returns_cannot_be_fed_back_into_the_model(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=4):
        out = greedy(model, ids, mask, return_dict_in_generate=True)
        cache = out.get("cache", out.get("past_key_values"))
        assert isinstance(cache, momentkv.MomentKVCache)
        with pytest.raises(ValueError, match="only inside generate"):
            model(input_ids=out.sequences[:, -1:], past_key_values=cache)


class _SlowStreamer:
    """A streamer whose every token takes a while, and which says when generation has begun."""

    def __init__(self):
        self.started = threading.Event()

    def put(self, value):
        self.started.set()
        threading.Event().wait(0.02)

    def end(self):
        pass


def test_unpatching_waits_for_the_generation_in_progress(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=4, recent_window=1, prompt_bucket=8):
        expected = greedy(model, ids, mask, 30)
    momentkv.patch(model, budget=4, recent_window=1, prompt_bucket=8)
    streamer, result = _SlowStreamer(), {}
    worker = threading.Thread(target=lambda: result.update(out=greedy(model, ids, mask, 30, streamer=streamer)))
    worker.start()
    assert streamer.started.wait(30)
    momentkv.unpatch(model)
    worker.join()
    assert torch.equal(result["out"], expected)
    assert not hasattr(model, "_momentkv")


def test_unpatching_from_inside_the_models_own_generation_is_refused(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    errors = []

    class Unpatcher(_SlowStreamer):
        def put(self, value):
            if not errors:
                try:
                    momentkv.unpatch(model)
                except RuntimeError as error:
                    errors.append(error)

    with momentkv.patched(model, budget=4):
        greedy(model, ids, mask, 4, streamer=Unpatcher())
    assert errors and "inside" in str(errors[0])


def _tiny_gemma3_vision(folder, vision_attention: str = "sdpa"):
    text = dict(SMALL, head_dim=16, num_hidden_layers=2, sliding_window=6, initializer_range=0.02,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=90, boi_token_index=91, eoi_token_index=92)
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    return transformers.Gemma3ForConditionalGeneration.from_pretrained(
        folder, attn_implementation={"text_config": "sdpa", "vision_config": vision_attention}).eval()


def test_a_vision_language_model_generates_exactly_from_an_image_prompt(tmp_path):
    model = _tiny_gemma3_vision(tmp_path)
    ids = torch.tensor([[1, 5, 91, 90, 90, 90, 90, 92, 7, 8, 9, 10, 11]])
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 28, 28)
    expected = greedy(model, ids, torch.ones_like(ids), pixel_values=pixels)
    with momentkv.patched(model, budget=16):
        assert torch.equal(greedy(model, ids, torch.ones_like(ids), pixel_values=pixels), expected)


def test_the_ocr_model_generates_exactly_from_an_image_prompt(tmp_path):
    """GOT-OCR2, the other vision-language class docs/models.md calls exact: its image tokens in the prompt."""
    from momentkv.evals.architectures import tiny_config

    config = tiny_config("got_ocr2", transformers.GotOcr2ForConditionalGeneration)
    config.text_config.max_position_embeddings = 512  # the image alone is 256 tokens
    torch.manual_seed(0)
    transformers.GotOcr2ForConditionalGeneration(config).save_pretrained(tmp_path, safe_serialization=True)
    model = transformers.GotOcr2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        image_tokens = model.model.get_image_features(pixel_values=pixels).pooler_output.shape[1]
    ids = torch.tensor([[1, 5, *[config.image_token_id] * image_tokens, 7, 8, 9, 10, 11]])
    expected = greedy(model, ids, torch.ones_like(ids), pixel_values=pixels)
    with momentkv.patched(model, budget=16):
        assert torch.equal(greedy(model, ids, torch.ones_like(ids), pixel_values=pixels), expected)
        assert momentkv.state_of(model).cache.budgeted_layers[0].state.n.sum() == 0, "nothing evicted: exact"


def test_unpatching_restores_each_parts_attention(tmp_path):
    model = _tiny_gemma3_vision(tmp_path, vision_attention="eager")
    before = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    assert before == ("sdpa", "eager")
    momentkv.patch(model, budget=8)
    assert model.config.vision_config._attn_implementation == "eager", "the vision tower was patched"
    momentkv.unpatch(model)
    assert (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation) == before


def test_any_failure_of_the_trial_generation_is_a_value_error_naming_the_model(tmp_path):
    """DeepSeek-V3's latent attention with a value head unlike its query-key head fails inside the model's own
    code during the trial; patch must say so as a ValueError naming the model type, the cause chained."""
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        kv_lora_rank=32, q_lora_rank=24, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="model type 'deepseek_v3'") as raised:
        momentkv.patch(model, budget=8)
    assert raised.value.__cause__ is not None
    assert not hasattr(model, "_momentkv") and model.config._attn_implementation != "momentkv"


@pytest.mark.parametrize("setting", [dict(use_cache=False), dict(num_beams=4), dict(stop_strings=["x"]),
                                     dict(num_return_sequences=2), dict(max_time=0.0)], ids=str)
def test_a_checkpoints_generation_settings_do_not_refuse_the_model(tiny_model, setting):
    """The trial generation of ``patch`` runs on its own settings; a setting momentkv cannot run is refused by the
    generate call that asks for it."""
    model = tiny_model("llama")
    for name, value in setting.items():
        setattr(model.generation_config, name, value)
    saved = model.generation_config.to_dict()
    momentkv.patch(model, budget=8)
    assert model.generation_config.to_dict() == saved
    if "use_cache" in setting or "num_beams" in setting:
        with pytest.raises(ValueError, match=next(iter(setting))):
            greedy(model, *left_padded_batch())


# Each refused option, as a keyword of generate and inside a GenerationConfig: both forms are refused alike.
REFUSED_OPTIONS = [dict(prefill_chunk_size=11), dict(assistant_early_exit=1), dict(prompt_lookup_num_tokens=2),
                   dict(penalty_alpha=0.6, top_k=4), dict(num_beams=2), dict(use_cache=False),
                   dict(output_attentions=True, return_dict_in_generate=True), dict(num_beam_groups=2, num_beams=2)]


@pytest.mark.parametrize("form", ["keyword", "generation_config"])
@pytest.mark.parametrize("option", REFUSED_OPTIONS, ids=str)
def test_refused_options_are_refused_by_name_in_either_form(tiny_model, option, form):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    name = next(iter(option))
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match=name):
            if form == "keyword":
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **option)
            else:
                config = GenerationConfig(max_new_tokens=4, pad_token_id=0, **option)
                model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def test_use_cache_none_as_a_keyword_is_refused_as_unpatched_generate_runs_without_a_cache(tiny_model):
    """``use_cache=None`` passed to generate overrides the default (transformers then decodes without a cache);
    in a GenerationConfig, None is unset and the default applies."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match="use_cache=None"):
            greedy(model, ids, mask, 4, use_cache=None)
        greedy(model, ids, mask, 4, generation_config=GenerationConfig(use_cache=None))


def test_a_prompt_given_as_embeddings_generates_as_unpatched(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    embeds = model.get_input_embeddings()(ids)
    expected = model.generate(input_ids=None, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8,
                              do_sample=False, pad_token_id=0)
    with momentkv.patched(model, budget=16):
        out = model.generate(input_ids=None, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)


def test_an_empty_cache_argument_means_no_cache_of_the_callers(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    expected = greedy(model, ids, mask)
    with momentkv.patched(model, budget=16):
        assert torch.equal(greedy(model, ids, mask, **{momentkv.patching.GENERATE_CACHE_ARG: None}), expected)


def test_a_short_context_model_patches_with_budget_alone(tmp_path):
    config = transformers.LlamaConfig(**dict(SMALL, max_position_embeddings=48))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch()
    expected = greedy(model, ids, mask, 8)
    with momentkv.patched(model, budget=30):
        assert torch.equal(greedy(model, ids, mask, 8), expected)
        assert momentkv.state_of(model).config.prompt_bucket <= 48


def test_an_option_given_beyond_a_short_context_is_still_refused(tmp_path):
    config = transformers.LlamaConfig(**dict(SMALL, max_position_embeddings=48))
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"recent_window must be an int in \[0, 48\]"):
        momentkv.patch(model, budget=8, recent_window=49)


def test_training_mode_attention_dropout_is_refused(tiny_model):
    """The decode step has no dropout; rather than drop the prompt's attention but not the decode step's, a
    generation in training mode with attention dropout is refused."""
    model = tiny_model("llama")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=8):
        model.train()
        with pytest.raises(ValueError, match="dropout"):
            greedy(model, ids, mask, 4)
        model.eval()
        greedy(model, ids, mask, 4)


def test_a_config_of_the_wrong_type_is_a_type_error_naming_config(tiny_model):
    with pytest.raises(TypeError, match="config must be a momentkv.MomentKVConfig"):
        momentkv.patch(tiny_model("llama"), config={"budget": 8})
