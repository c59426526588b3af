"""Every registered rule through the one engine (kvpress style: one parametrised test over every rule), the
registry's checks, and the two rules added through the registry alone (key norm, KeyDiff) against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

import momentkv
from conftest import left_padded_batch
from momentkv import presets
from momentkv.ops import STORED, call
from momentkv.patches.rule import decode_scores, held_keys, prompt_scores
from momentkv.policies import policy
from momentkv.policies.keydiff import keydiff
from momentkv.policies.keynorm import keynorm
from op_states import layer_state, step_settings

RULES = momentkv.policy_names()
KERNEL_RULES = [name for name in RULES if policy(name).kernel is not None]


def greedy(model, ids, mask, tokens, **extra):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **extra)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture
def registered():
    """Register rules for one test; each is removed after it."""
    names = []

    def add(name, fn):
        momentkv.register_policy(name, fn)
        names.append(name)
        return name

    yield add
    for name in names:
        momentkv.unregister_policy(name)


@pytest.mark.parametrize("name", RULES)
def test_every_rule_is_exact_with_nothing_evicted(tiny_model, name):
    """A budget the generation never fills: every rule gives the unpatched model's tokens and logits, in a
    left-padded batch, with the prompt competing (so the rule scores the prompt too)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    expected = greedy(model, ids, mask, 12)
    with momentkv.patched(model, budget=64, policy=name, prompt_bucket=16):
        tokens, logits = greedy(model, ids, mask, 12)
    assert torch.equal(tokens, expected[0])
    torch.testing.assert_close(logits, expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", RULES)
def test_every_rule_keeps_the_budget_and_its_own_choice(tiny_model, name):
    """Over the budget, with a prefill budget: each head holds at most the prompt slots and ``budget`` decode
    tokens (the free slot aside), outputs stay finite, and the rule decides: it evicts other tokens than the
    plain window does (random aside, which is seeded, every rule here is deterministic and scores differently)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    options = dict(budget=4, recent_window=2, prompt_bucket=8, prefill_budget=8, sinks=1)
    kept = {}
    for rule in (name, "window"):
        with momentkv.patched(model, policy=rule, **options):
            tokens, logits = greedy(model, ids, mask, 24)
            layers = momentkv.state_of(model).cache.budgeted_layers
            assert torch.isfinite(logits).all()
            for layer in layers:
                assert (layer.state.valid.sum(-1) <= 8 + 4).all(), "more tokens held than the prompt slots + budget"
                assert (layer.state.n > 0).all(), "the moments hold what went"
            kept[rule] = torch.stack([layer.state.positions.masked_fill(~layer.state.valid, -1).sort(-1).values
                                      for layer in layers])
    if name != "window":
        assert not torch.equal(kept[name], kept["window"]), f"{name} chose exactly what the window chose"


@pytest.mark.parametrize("name", KERNEL_RULES)
def test_a_rule_with_a_fused_kernel_matches_its_function(tiny_model, registered, name):
    """The built-in rules' fused kernels compute their registered functions: the same function registered under
    another name runs on the engine's generic path (attention, the function, eviction) and decodes alike."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    generic = registered(f"{name}-as-registered", policy(name).fn)
    options = dict(budget=4, recent_window=2, prompt_bucket=8, prefill_budget=8, sinks=1, seed=3)
    outputs = []
    for rule in (name, generic):
        with momentkv.patched(model, policy=rule, **options):
            outputs.append(greedy(model, ids, mask, 24))
    assert torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, preset", [("h2o", presets.h2o), ("tova", presets.tova)])
def test_h2o_and_tova_rules_equal_the_momentum_settings_of_their_presets(tiny_model, name, preset):
    """The registered H2O and TOVA rules (the engine's generic path) decide as the presets do, which are
    momentum settings on the fused kernels (alpha 1 or 0, no bias correction)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    config = preset(4, prefill_budget=8, prompt_bucket=8)
    outputs = []
    for each in (config, config.__class__(**{**config.__dict__, "policy": name})):
        with momentkv.patched(model, config=each):
            outputs.append(greedy(model, ids, mask, 24))
    assert torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-4, atol=1e-4)


def test_a_registered_rule_compiles_into_one_graph(tiny_model):
    """The generic path (write, attention, the rule's function, eviction) under ``torch.compile(fullgraph=True)``:
    one graph, no recompile, the eager tokens."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    options = dict(budget=4, policy="keydiff", prompt_bucket=16)
    with momentkv.patched(model, **options):
        eager = greedy(model, ids, mask, 20)
    torch._dynamo.reset()
    counters.clear()
    with momentkv.patched(model, compile=True, **options), torch._dynamo.config.patch(error_on_recompile=True):
        compiled = greedy(model, ids, mask, 20)
        assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)


# -- refusals ---------------------------------------------------------------------------------------------
def _wrong_shape(score, attention, position, key, step):
    return score[..., :-1]


def _wrong_dtype(score, attention, position, key, step):
    return score.double()


def _wrong_device(score, attention, position, key, step):
    return torch.empty_like(score, device="meta")


def _raises(score, attention, position, key, step):
    raise RuntimeError("boom")


def _not_a_tensor(score, attention, position, key, step):
    return 0.0


@pytest.mark.parametrize("fn, words", [(_wrong_shape, "shaped"), (_wrong_dtype, "float64"), (_wrong_device, "meta"),
                                       (_raises, "raised RuntimeError: boom"), (_not_a_tensor, "returned float")])
def test_a_broken_rule_is_refused_at_patch_naming_it(tiny_model, registered, fn, words):
    model = tiny_model("llama")
    name = registered(f"broken-{fn.__name__}", fn)
    with pytest.raises(ValueError, match=f"cannot use policy '{name}'.*{words}"):
        momentkv.patch(model, budget=4, policy=name)
    assert not hasattr(model, "_momentkv"), "a refused patch leaves the model as it was"


def test_a_rule_refused_with_the_prompt_kept_is_refused_at_its_first_decode_step(tiny_model, registered):
    """With the prompt kept and fitting its slots no prompt token is scored, so the trial's decode step is where
    a broken rule shows."""
    model = tiny_model("llama")
    name = registered("broken-kept", _wrong_shape)
    with pytest.raises(ValueError, match=f"cannot use policy '{name}'"):
        momentkv.patch(model, budget=4, policy=name, protect_prompt=True)


def _score_only(score, attention, position, key, step):
    return score


@pytest.mark.parametrize("fn, error, words", [
    (lambda score, attention, position, key: score, TypeError, "exactly the positional parameters"),
    (lambda score, attention, position, key, step, extra: score, TypeError, "exactly the positional parameters"),
    (lambda *args: args[0], TypeError, "exactly the positional parameters"),
    (lambda score, attention, position, key, step, *, budgets: score, TypeError, "asks for budgets"),
    (3, TypeError, "fn must be callable"),
])
def test_register_policy_checks_the_function(fn, error, words):
    with pytest.raises(error, match=words):
        momentkv.register_policy("never-registered", fn)
    assert "never-registered" not in momentkv.policy_names()


def test_register_policy_checks_the_name(registered):
    with pytest.raises(ValueError, match="'momentum' is already registered"):
        momentkv.register_policy("momentum", _score_only)
    for bad in ("", " padded ", 3):
        with pytest.raises(TypeError, match="name must be a non-empty str"):
            momentkv.register_policy(bad, _score_only)
    with pytest.raises(ValueError, match="no policy named 'absent'"):
        momentkv.unregister_policy("absent")
    name = registered("extras", lambda score, attention, position, key, step, *, alpha, layer, seen: score)
    assert policy(name).extras == ("alpha", "layer", "seen")


# -- the two rules added through the registry, against brute force --------------------------------------------
def slots(seed=0, b=2, h=3, s=9, d=8):
    """Random keys with some slots holding no token (zero keys, as the engine gives a rule)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, s, d, generator=gen) * torch.rand(b, h, s, 1, generator=gen) * 3
    valid = torch.rand(b, h, s, generator=gen) > 0.3
    zeros = torch.zeros(b, h, s)
    return held_keys(keys, valid), valid, zeros


def test_keynorm_is_minus_each_key_l2_norm():
    key, valid, zeros = slots()
    score = keynorm(zeros, zeros, zeros.long(), key, torch.tensor(0))
    for index in valid.nonzero().tolist():
        assert math.isclose(score[tuple(index)].item(), -math.sqrt(sum(x * x for x in key[tuple(index)].tolist())),
                            rel_tol=1e-5)


def test_keydiff_is_minus_the_cosine_to_the_mean_unit_key_of_the_held_slots():
    key, valid, zeros = slots(seed=1)
    score = keydiff(zeros, zeros, zeros.long(), key, torch.tensor(0))
    b, h, s, d = key.shape
    for bi in range(b):
        for hi in range(h):
            held = [key[bi, hi, j].double() for j in range(s) if valid[bi, hi, j]]
            units = [k / k.norm() for k in held]
            anchor = sum(units) / len(units)
            anchor = anchor / anchor.norm()
            for j in range(s):
                if valid[bi, hi, j]:
                    k = key[bi, hi, j].double()
                    assert math.isclose(score[bi, hi, j].item(), -(k @ anchor / k.norm()).item(), rel_tol=1e-4,
                                        abs_tol=1e-6)


@pytest.mark.parametrize("name", ["keynorm", "keydiff"])
def test_the_engine_evicts_what_the_rule_ranks_lowest(name):
    """One decode step of the generic path on a layer's slots: the rule's score lands in ``importance`` for the
    slots holding a token, and the victim is the lowest-scored candidate outside the recent window (brute force
    over the slots)."""
    gen = torch.Generator().manual_seed(2)
    b, h, s, d = 2, 2, 12, 8
    state = layer_state(keys=torch.randn(b, h, s, d, generator=gen), values=torch.randn(b, h, s, d, generator=gen))
    state.valid[:, :, 3] = False
    state.seen.fill_(s)
    state.decode_len.fill_(6)
    rule = policy(name).bind(momentkv.MomentKVConfig(budget=4, policy=name), layer=0)
    attention = torch.rand(b, h, s, generator=gen)
    decode_scores(rule, state, attention)
    score = state.importance.clone()
    expected_score = policy(name).fn(torch.zeros(b, h, s), attention, state.positions,
                                     held_keys(state.keys, state.valid), state.decode_len)
    torch.testing.assert_close(score[state.valid], expected_score[state.valid])
    before = state.valid.clone()
    call("evict", state, step_settings(budget=4, score_kind=STORED, recent_window=2), route="reference")
    for bi in range(b):
        for hi in range(h):
            candidates = [j for j in range(s) if before[bi, hi, j] and state.positions[bi, hi, j] < s - 2]
            victim = min(candidates, key=lambda j: (score[bi, hi, j].item(), j))
            assert (before[bi, hi] & ~state.valid[bi, hi]).nonzero().flatten().tolist() == [victim]


def test_prompt_scores_run_the_rule_over_the_observation_queries():
    """At prefill a registered rule sees each observation query's attention in turn, with the keys each query
    sees; H2O's rule (the sum of them) then equals the momentum recurrence at alpha 1 (the fused prefill op)."""
    from momentkv.ops.prefill import prefill_scores_reference

    gen = torch.Generator().manual_seed(4)
    query, keys = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 11, 8, generator=gen)
    key_valid = torch.ones(2, 11, dtype=torch.bool)
    key_valid[1, :3] = False
    rule = policy("h2o").bind(momentkv.MomentKVConfig(budget=4, policy="h2o"), layer=0)
    score, normalizer = prompt_scores(rule, query, keys, key_valid, 0.3, alpha=1.0)
    expected_score, expected_normalizer = prefill_scores_reference(query, keys, key_valid, 0.3, 1.0)
    torch.testing.assert_close(score, expected_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normalizer, expected_normalizer)
