"""momentkv on tiny random models of every supported architecture."""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
from transformers import MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList

import momentkv
from momentkv.ops import selection
from momentkv.patches import cache as budgeted_cache
from conftest import ARCHITECTURES, left_padded_batch


def greedy(model, ids, mask, new_tokens, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_exact_when_budget_covers_the_generation(tiny_model, arch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    expected = greedy(model, ids, mask, 24)
    single = greedy(model, ids[1:2, -5:], mask[1:2, -5:], 24)
    with momentkv.patched(model, budget=24, recent_window=4, prompt_bucket=16):
        assert torch.equal(greedy(model, ids, mask, 24), expected)
        assert torch.equal(greedy(model, ids[1:2, -5:], mask[1:2, -5:], 24), single)
    assert torch.equal(greedy(model, ids, mask, 24), expected), "unpatching must restore the model"


class BudgetProbe(StoppingCriteria):
    """Checks the cache after every step: never more than prompt + budget tokens per head, fixed buffers."""

    def __init__(self, model, budget):
        self.model, self.budget, self.steps = model, budget, 0
        self.prompt = self.addresses = self.nbytes = None

    def __call__(self, input_ids, scores, **kwargs):
        cache = momentkv.state_of(self.model).active
        layers = cache.budgeted_layers
        if self.prompt is None:
            self.prompt = [layer.state.valid[..., : layer.prompt_slots].sum(-1).clone() for layer in layers]
            self.addresses = [[t.data_ptr() for t in layer.buffers()] for layer in layers]
            self.nbytes = cache.nbytes()
        for layer, prompt, addresses in zip(layers, self.prompt, self.addresses):
            assert layer.keys.shape[2] == layer.prompt_slots + self.budget + 1
            stored = layer.state.valid.sum(-1)
            assert (stored <= prompt + self.budget).all()
            assert [t.data_ptr() for t in layer.buffers()] == addresses
            assert torch.isfinite(layer.state.mu_k).all() and torch.isfinite(layer.state.comoment).all()
        assert cache.nbytes() == self.nbytes
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


SETTINGS = [
    dict(policy="momentum"),
    dict(policy="momentum", alpha=1.0, bias_correction=False, recent_window=0),
    dict(policy="momentum", alpha=0.0, scope="layer"),
    dict(policy="window", correction="none"),
    dict(policy="random", seed=7),
    dict(policy="window", protect_prompt=False, sinks=2, recent_window=1),
    dict(policy="momentum", protect_prompt=False, sinks=2, scope="layer", correction="none"),
    dict(policy="momentum", prefill_budget=6, sinks=2, recent_window=2),
    dict(policy="momentum", protect_prompt=False, sinks=2, recent_window=40),  # window beyond the cache
]


@pytest.mark.parametrize("arch, settings", list(itertools.product(["llama", "gemma3"], SETTINGS))
                         + [(arch, SETTINGS[0]) for arch in ARCHITECTURES if arch not in ("llama", "gemma3")])
def test_small_budget_stays_bounded(tiny_model, arch, settings):
    settings = dict(settings)
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    budget = 4
    with momentkv.patched(model, budget=budget, recent_window=settings.pop("recent_window", 2), prompt_bucket=8,
                          **settings):
        probe = BudgetProbe(model, budget)
        out = greedy(model, ids, mask, 30, stopping_criteria=StoppingCriteriaList([probe]))
        cache = momentkv.state_of(model).cache
    assert out.shape == (3, ids.shape[1] + 30) and probe.steps == 30
    layer = cache.budgeted_layers[0]
    prompt_tokens = mask.sum(-1)
    stored = layer.state.valid.sum(-1)
    if settings.get("prefill_budget"):
        assert (stored <= settings["prefill_budget"] + budget).all()
    else:
        assert (stored == prompt_tokens[:, None] + budget).all()
        evicted = (ids.shape[1] + 29) - (ids.shape[1] - prompt_tokens)[:, None] - stored
        if settings.get("correction", "moments") == "moments":
            assert torch.equal(layer.state.n, evicted.float())


def test_window_beyond_the_cache_keeps_sinks_and_the_newest(tiny_model):
    """A recent window larger than the cache, prompt tokens competing: the StreamingLLM rule,
    at prefill compression and at decode alike (here the 7/8 cap leaves one candidate, the oldest)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=4, protect_prompt=False, sinks=2, recent_window=40, prefill_budget=6,
                          prompt_bucket=8):
        greedy(model, ids, mask, 12)
        layer = momentkv.state_of(model).cache.budgeted_layers[0]
    seen = layer.state.seen.item()
    for row, padding in enumerate((ids.shape[1] - mask.sum(-1)).tolist()):
        for head in range(layer.num_heads):
            kept = layer.state.positions[row, head][layer.state.valid[row, head]].sort().values.tolist()
            assert kept == [padding, padding + 1, *range(seen - len(kept) + 2, seen)], (row, head)


@pytest.mark.parametrize("protect_prompt", [True, False])
def test_prefill_window_leaves_the_vote_a_choice(tiny_model, protect_prompt):
    """A recent window as large as the prefill budget: the prefill selection caps it at 7/8 of the
    10 non-sink slots (9), as at decode, so the vote still chooses one (without the cap it was the
    StreamingLLM selection, sinks plus the newest 10)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(30, 24, 20))

    def prompt_kept(window):
        with momentkv.patched(model, budget=12, prefill_budget=12, sinks=2, recent_window=window, prompt_bucket=4,
                              protect_prompt=protect_prompt):
            greedy(model, ids, mask, 1)
            layers = momentkv.state_of(model).cache.budgeted_layers
            return torch.stack([layer.state.positions[..., :12].sort(-1).values for layer in layers])

    capped = prompt_kept(12)
    assert torch.equal(capped, prompt_kept(9))
    newest = torch.arange(ids.shape[1] - 9, ids.shape[1])
    assert (capped[..., -9:] == newest).all()
    assert not (capped[..., 2] == ids.shape[1] - 10).all(), "the vote chose exactly StreamingLLM's token everywhere"


def test_prefill_window_sets_the_prefill_selections_window_alone(tiny_model):
    """prefill_window: the prefill selection keeps the newest ``prefill_window`` prompt tokens, as a decode window
    of that size would, while decoding keeps its own ``recent_window`` (the long prompts at ratio 0.875: the decode
    window of 256 took 221 of the 252 choosable prefill slots, docs/results.md)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(30, 24, 20))

    def prompt_kept(**window):
        with momentkv.patched(model, budget=12, prefill_budget=12, sinks=2, prompt_bucket=4, **window):
            greedy(model, ids, mask, 1)
            state = momentkv.state_of(model)
            layers = state.cache.budgeted_layers
            kept = torch.stack([layer.state.positions[..., :12].sort(-1).values for layer in layers])
            return kept, state.config.step_settings().recent_window

    narrow, decode_window = prompt_kept(recent_window=9, prefill_window=2)
    assert decode_window == 9
    assert torch.equal(narrow, prompt_kept(recent_window=2)[0])
    assert not torch.equal(narrow, prompt_kept(recent_window=9)[0])


def test_prefill_window_without_a_prefill_budget_is_refused():
    with pytest.raises(ValueError, match="prefill_window=8 needs a prefill_budget"):
        momentkv.MomentKVConfig(budget=16, prefill_window=8)


@pytest.mark.parametrize("arch, alone_differ", [("llama", True), ("gemma3", False)])
def test_prefill_vote_shares_the_prompt_selection(tiny_model, arch, alone_differ):
    """prefill_vote=1: every budgeted layer and head keeps the same prompt tokens (the deeper layers'
    vote); prefill_vote=0: each chooses alone (on the tiny llama they differ; gemma3's single
    full-attention layer happens to pick the same tokens in both heads)."""
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    kept = {}
    for vote in (0.0, 1.0):
        with momentkv.patched(model, budget=4, prefill_budget=8, sinks=1, recent_window=2, prompt_bucket=4,
                              prefill_vote=vote):
            greedy(model, ids, mask, 1)
            layers = momentkv.state_of(model).cache.budgeted_layers
            kept[vote] = torch.stack([layer.state.positions[..., :8].masked_fill(~layer.state.valid[..., :8], -1)
                                      for layer in layers])  # layers x batch x heads x prompt slots
    shared = kept[1.0]
    assert (shared == shared[:1, :, :1]).all()
    assert (kept[0.0] == kept[0.0][:1, :, :1]).all() != alone_differ
    assert torch.equal((shared >= 0).sum(-1), mask.sum(-1).clamp_max(8)[None, :, None].expand_as(shared[..., 0]))


def test_only_layers_from_vote_depth_vote(tiny_model):
    """Of the tiny llama's two layers, vote_depth=0.5 lets only the second vote: the same choice as all
    layers voting with the first layer's scores zeroed, and not the choice of both voting as they are
    (tokens scored alone: a carry of 10 over a 16-token prompt would leave the layers little to differ on)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    score = budgeted_cache.prompt_score
    calls = []

    def first_layer_silent(*args):
        calls.append(None)
        value = score(*args)
        return torch.zeros_like(value) if len(calls) == 1 else value

    def kept(depth, silence_first=False):
        calls.clear()
        with momentkv.patched(model, budget=4, prefill_budget=8, sinks=1, recent_window=2, prompt_bucket=4,
                              vote_depth=depth, prefill_carry=0), \
                mock.patch.object(budgeted_cache, "prompt_score", first_layer_silent if silence_first else score):
            greedy(model, ids, mask, 1)
            layer = momentkv.state_of(model).cache.budgeted_layers[0]
            return layer.state.positions[..., :8].masked_fill(~layer.state.valid[..., :8], -1)

    deep_only = kept(0.5)
    assert torch.equal(deep_only, kept(0.0, silence_first=True))
    assert not torch.equal(deep_only, kept(0.0))


@pytest.mark.parametrize("carry, chosen", [(0, [10, 11, 12, 13, 3]), (4, [3, 4, 5, 6, 7])])
def test_prefill_carry_keeps_what_follows_a_hit(tiny_model, carry, chosen):
    """One prompt token the queries attend to (a key named by the question): with ``prefill_carry`` the tokens
    after it inherit its score and are kept with it (the value after the key), in place of the next-best."""
    model = tiny_model("llama")
    ids = torch.arange(1, 17)[None]
    score = selection.eviction_score

    def one_hit(*args):
        value = score(*args)
        if value.shape[-1] != 16:  # a decode eviction, not the prompt's selection
            return value
        hit = torch.arange(16, dtype=value.dtype) * 1e-3  # below the hit, later tokens higher
        hit[3] = 1.0
        return hit.expand_as(value).clone()

    with momentkv.patched(model, budget=4, prefill_budget=8, sinks=1, recent_window=2, prompt_bucket=4,
                          prefill_carry=carry), mock.patch.object(selection, "eviction_score", one_hit):
        greedy(model, ids, torch.ones_like(ids), 1)
        for layer in momentkv.state_of(model).cache.budgeted_layers:
            kept = set(layer.state.positions[..., :8].flatten().tolist())
            assert kept == {0, 14, 15, *chosen}


def test_default_open_window_leaves_momentum_a_choice(tiny_model):
    """Prompt tokens competing, a short prompt: the default window (64) exceeds the cache, but at
    decode it is capped at 7/8 of the evictable slots, so the newest 7/8 stay and momentum, not age,
    picks among the rest (without the cap, every head would hold the sinks plus the newest)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=16, protect_prompt=False, sinks=2, prompt_bucket=8):
        greedy(model, ids, mask, 40)
        layers = momentkv.state_of(model).cache.budgeted_layers
    momentum_chose = False
    for layer in layers:
        seen = layer.state.seen.item()
        held = (layer.state.valid & layer.state.evictable).sum(-1) + 1  # at the last eviction, the new token included
        for row, padding in enumerate((ids.shape[1] - mask.sum(-1)).tolist()):
            for head in range(layer.num_heads):
                kept = layer.state.positions[row, head][layer.state.valid[row, head]].sort().values.tolist()
                window = int(held[row, head] - held[row, head] // 8)
                assert kept[:2] == [padding, padding + 1] and kept[-window:] == list(range(seen - window, seen))
                momentum_chose |= kept != [padding, padding + 1, *range(seen - len(kept) + 2, seen)]
    assert momentum_chose


def test_memory_does_not_grow_with_generation_length(tiny_model):
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=4, prompt_bucket=16):
        greedy(model, ids, mask, 8)
        cache = momentkv.state_of(model).cache
        short = cache.nbytes()
        greedy(model, ids, mask, 60)
        assert momentkv.state_of(model).cache is cache, "same shape must reuse the same buffers"
        assert cache.nbytes() == short
        layer = cache.budgeted_layers[0]
        assert short == len(cache.budgeted_layers) * layer.nbytes()
        assert layer.keys.shape == (3, 2, 16 + 4 + 1, 16)


def test_sampling_and_stopping_criteria_run(tiny_model):
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()
    with momentkv.patched(model, budget=4, recent_window=1, prompt_bucket=8):
        torch.manual_seed(0)
        sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20,
                                 temperature=0.8, pad_token_id=0)
        stop = StoppingCriteriaList([MaxLengthCriteria(max_length=ids.shape[1] + 5)])
        stopped = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=50, pad_token_id=0,
                                 stopping_criteria=stop)
    assert sampled.shape[1] == ids.shape[1] + 12
    assert stopped.shape[1] == ids.shape[1] + 5


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_tiny_models_are_sensitive_to_the_cache(tiny_model, arch):
    """Guards the exactness test above: on these models a tiny budget does change greedy output."""
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    expected = greedy(model, ids, mask, 40)
    with momentkv.patched(model, budget=2, recent_window=1, prompt_bucket=4, correction="none"):
        squeezed = greedy(model, ids, mask, 40)
    assert expected[:, ids.shape[1]:].unique().numel() > 8
    assert not torch.equal(squeezed, expected)


def test_cache_layers_from_transformers_517_layer_kwargs(tiny_model):
    """transformers before 5.24 gives one kwargs dict for every layer, not a list per layer: zipping the
    dict's keys with the layers once built a cache with fewer layers than the model (IndexError on the
    GPU image's transformers 5.17)."""
    from momentkv.patches import support

    model = tiny_model("gemma3")
    kinds, per_layer = support.get_layer_types_and_kwargs(model.config)
    shared = per_layer[0] if isinstance(per_layer, list) else per_layer
    with mock.patch.object(support, "get_layer_types_and_kwargs", lambda config: (kinds, dict(shared))):
        cache = momentkv.MomentKVCache(model.config, momentkv.MomentKVConfig(budget=4), prompt_slots=8)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert [type(layer).__name__ for layer in cache.layers] == ["StaticSlidingWindowLayer", "BudgetedLayer",
                                                                "StaticSlidingWindowLayer"]
