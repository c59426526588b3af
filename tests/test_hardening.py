"""Bad input, edge cases and isolation: clear errors or documented, tested behaviour (docs/bad-inputs.md)."""

from __future__ import annotations

import pytest
import torch
import transformers

import momentkv
from conftest import left_padded_batch
from momentkv.evals import full_cache_reference, load_smollm2, teacher_forced
from momentkv.evals.long_run import long_run


def greedy(model, ids, mask, new_tokens=20, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **kwargs)


def test_budget_beyond_the_models_context_is_refused(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"budget must be an int in \[1, 256\]"):
        momentkv.patch(model, budget=257)


def test_prompt_beyond_the_models_context_is_refused(tiny_model):
    model = tiny_model("llama")
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match="more than the model's context of 256"):
            model.generate(input_ids=torch.randint(3, 90, (1, 257)), max_new_tokens=2, pad_token_id=0)


def test_assisted_generation_is_refused(tiny_model):
    model, assistant = tiny_model("llama"), tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match="assistant_model"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, assistant_model=assistant)


def test_inputs_are_not_mutated(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    ids_before, mask_before = ids.clone(), mask.clone()
    config = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0)
    config_before = config.to_dict()
    with momentkv.patched(model, budget=2, recent_window=1):
        model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert torch.equal(ids, ids_before) and torch.equal(mask, mask_before)
    assert config.to_dict() == config_before


def test_rows_never_influence_each_other(tiny_model):
    """With eviction under way, each row of a batch decodes exactly as it does alone."""
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=16):
        batch = greedy(model, ids, mask, 30)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = greedy(model, ids[row:row + 1, real], mask[row:row + 1, real], 30)
            assert torch.equal(alone[0, -30:], batch[row, -30:]), f"row {row} differs when batched"


def test_rows_of_a_serving_sized_batch_decode_as_alone(tiny_model):
    """The throughput benchmark runs up to 32 rows of mixed lengths (evals/capacity.py). At that batch the fused CPU
    kernels' loops pass aten's grain and are split over threads (ops/cpu.py: OPTIONS); each row still gets, logit
    for logit, what it gets alone."""
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch(lengths=tuple(range(9, 41)))

    def logits(ids, mask):
        out = greedy(model, ids, mask, 24, return_dict_in_generate=True, output_logits=True)
        return out.sequences[:, -24:], torch.stack(out.logits, 1)

    with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=16):
        tokens, batch = logits(ids, mask)
        for row in (0, 17, 31):
            real = mask[row].bool()
            alone_tokens, alone = logits(ids[row:row + 1, real], mask[row:row + 1, real])
            assert torch.equal(alone_tokens[0], tokens[row]), f"row {row}: tokens differ when batched"
            torch.testing.assert_close(alone[0], batch[row], atol=1e-4, rtol=1e-4, msg=f"row {row} differs batched")


def test_a_row_that_is_all_padding_neither_fails_nor_leaks(tiny_model):
    """Documented behaviour: the empty row generates from nothing but its own tokens; others are unaffected."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    ids_pad = torch.cat([ids, torch.zeros_like(ids[:1])])
    mask_pad = torch.cat([mask, torch.zeros_like(mask[:1])])
    with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=16):
        alone = greedy(model, ids, mask, 25)
        out = model.generate(input_ids=ids_pad, attention_mask=mask_pad, max_new_tokens=25, min_new_tokens=25,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:3], alone)
    assert not any(torch.isnan(s).any() for s in out.scores)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_every_float_dtype_runs_and_stays_close(tiny_model, dtype):
    """fp32 is token-exact; in half precision our fp32-accumulated attention rounds differently from
    SDPA's, so a near-tie can flip and free-run text diverge: judged teacher-forced instead."""
    model = tiny_model("llama", dtype)
    ids, mask = left_padded_batch()
    reference, scores = full_cache_reference(model, ids, mask, 24)
    with momentkv.patched(model, budget=24):
        fidelity = teacher_forced(model, ids, mask, reference, scores)
        if dtype == torch.float32:
            assert torch.equal(greedy(model, ids, mask, 24)[:, -24:], reference)
        cache = momentkv.state_of(model).cache
    assert cache.budgeted_layers[0].keys.dtype == dtype
    assert cache.budgeted_layers[0].state.comoment.dtype == torch.float32, "moments stay in fp32"
    assert fidelity.top1 >= 0.95 and fidelity.kl < 1e-3, fidelity


def test_long_generation_keeps_memory_flat_and_numbers_finite():
    """Shortened form of `momentkv long-run --tokens 20000` (full output in results/long-run-cpu.json)."""
    for dtype in (torch.float32, torch.bfloat16):
        run = long_run(1500, dtype, every=300, budget=16)
        assert run.finite
        assert run.checkpoints[-1]["evicted_per_head"] > 1400
        assert run.growth_after_warmup() < 4 * 2**20, "process memory grew after warm-up"


def test_weights_load_only_through_safetensors(monkeypatch, tmp_path):
    calls = []
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("MOMENTKV_HOME", str(tmp_path))

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(RuntimeError, match="stop here"):
        load_smollm2()
    assert calls[0]["use_safetensors"] is True and "trust_remote_code" not in calls[0]


def test_compile_option_must_be_a_bool_or_none(tiny_model):
    with pytest.raises(TypeError, match="compile"):
        momentkv.patch(tiny_model("llama"), budget=8, compile="yes")


def test_several_new_tokens_in_one_step_are_refused(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=8):
        with pytest.raises(ValueError, match="prefill_chunk_size: chunked prefill"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                           prefill_chunk_size=4)
