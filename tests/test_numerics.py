"""The moment correction stays finite in fp16 and bf16 wherever plain attention does.

Its first-order term ``(s / n) C q`` grows without bound with the logits; the evicted set's true
contribution is a weighted mean of its values, inside their range, so the virtual value is kept there.
"""

from __future__ import annotations

import pytest
import torch

import momentkv
from conftest import left_padded_batch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_large_logits_stay_finite_with_the_correction(tiny_model, dtype, scale):
    model = tiny_model("llama", dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
            layer.self_attn.k_proj.weight.mul_(scale)
    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                  pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    finite = lambda out: all(torch.isfinite(step).all() for step in out.logits)  # noqa: E731
    assert finite(model.generate(**kwargs)), "plain attention itself overflows: no claim to make"
    for correction in ("moments", "none"):
        with momentkv.patched(model, budget=3, recent_window=1, prompt_bucket=4, correction=correction):
            assert finite(model.generate(**kwargs)), correction


def test_virtual_value_stays_within_the_evicted_values_range():
    """Op level: keys far apart make the first-order term huge; the output stays a weighted mean of values."""
    from momentkv.ops.kernels import REFERENCES
    from op_states import layer_state

    gen = torch.Generator().manual_seed(0)
    b, h, s, d = 1, 1, 4, 8
    evicted_k, evicted_v = torch.randn(6, d, generator=gen) * 1e3, torch.rand(6, d, generator=gen)
    n = torch.full((b, h), 6.0)
    mu_k, mu_v = evicted_k.mean(0).view(b, h, d), evicted_v.mean(0).view(b, h, d)
    comoment = ((evicted_v - mu_v.view(d)).T @ (evicted_k - mu_k.view(d))).view(b, h, d, d)
    value_range = torch.stack([evicted_v.amin(0), evicted_v.amax(0)]).view(b, h, 2, d)
    keys, values = torch.randn(b, h, s, d, generator=gen), torch.rand(b, h, s, d, generator=gen)
    query = torch.randn(b, h, d, generator=gen)
    state = layer_state(keys=keys, values=values, n=n, mu_k=mu_k, mu_v=mu_v, comoment=comoment,
                        value_range=value_range)
    out = REFERENCES["decode_attention"](query=query, **state.named(), scale=1.0, alpha=0.9, moments=True,
                                         moment_weight=0.0, sink_logits=None)
    assert (out >= 0).all() and (out <= 1).all(), out  # every value lies in [0, 1)
