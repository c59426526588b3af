import math

import pytest

import momentkv
from momentkv import MomentKVConfig
from momentkv.ops.scores import HASH, NORMALIZED, POSITION, STORED


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": -3}, ValueError, "budget"),
        ({"budget": 2.5}, TypeError, "budget"),
        ({"budget": True}, TypeError, "budget"),
        ({"budget": 8, "alpha": 1.5}, ValueError, "alpha"),
        ({"budget": 8, "alpha": -0.1}, ValueError, "alpha"),
        ({"budget": 8, "alpha": math.nan}, ValueError, "alpha"),
        ({"budget": 8, "alpha": "0.9"}, TypeError, "alpha"),
        ({"budget": 8, "policy": "lru"}, ValueError, "policy"),
        ({"budget": 8, "correction": "second-order"}, ValueError, "correction"),
        ({"budget": 8, "moment_weight": 1.5}, ValueError, "moment_weight"),
        ({"budget": 8, "moment_weight": None}, TypeError, "moment_weight"),
        ({"budget": 8, "moment_weight": 0.5, "correction": "none"}, ValueError, "moment_weight"),
        ({"budget": 8, "recent_window": 9, "protect_prompt": True}, ValueError, "recent_window"),
        ({"budget": 8, "recent_window": -1}, ValueError, "recent_window"),
        ({"budget": 8, "sinks": -1}, ValueError, "sinks"),
        ({"budget": 8, "prefill_budget": 4, "sinks": 4}, ValueError, "prefill_budget"),
        ({"budget": 8, "scope": "model"}, ValueError, "scope"),
        ({"budget": 8, "prompt_bucket": 0}, ValueError, "prompt_bucket"),
        ({"budget": 8, "observation_window": 0}, ValueError, "observation_window"),
        ({"budget": 8, "prefill_vote": 2}, ValueError, "prefill_vote"),
        ({"budget": 8, "prefill_vote": "half"}, TypeError, "prefill_vote"),
        ({"budget": 8, "vote_depth": 1.0}, ValueError, r"vote_depth must be a float in \[0, 1\)"),
        ({"budget": 8, "prefill_carry": -1}, ValueError, "prefill_carry must be an int >= 0"),
        ({"budget": 8, "prefill_carry": 2.5}, TypeError, "prefill_carry"),
        ({"budget": 8, "vote_depth": -0.5}, ValueError, r"vote_depth must be a float in \[0, 1\)"),
        ({"budget": 8, "protect_prompt": "yes"}, TypeError, "protect_prompt"),
        ({"budget": 8, "bias_correction": 1}, TypeError, "bias_correction"),
    ],
)
def test_invalid_values_name_the_parameter(options, error, words):
    with pytest.raises(error, match=words):
        MomentKVConfig(**options)


def test_baselines_are_settings():
    assert MomentKVConfig(budget=8, alpha=1, bias_correction=False).alpha == 1.0
    assert MomentKVConfig(budget=8, alpha=0).alpha == 0.0
    assert MomentKVConfig(budget=8, policy="window", protect_prompt=False, sinks=4).step_settings().score_kind == POSITION


@pytest.mark.parametrize("config, settings", [
    (dict(), dict(alpha=0.9, moments=True, moment_weight=0.0, budget=8, score_kind=NORMALIZED, recent_window=64,
                  cap_window=True, layer_scope=False, seed=0)),
    (dict(policy="momentum", bias_correction=False, correction="none", scope="layer", protect_prompt=True, seed=3),
     dict(alpha=0.9, moments=False, moment_weight=0.0, budget=8, score_kind=STORED, recent_window=7,
          cap_window=False, layer_scope=True, seed=3)),
    (dict(policy="random"), dict(score_kind=HASH)),
    (dict(policy="keynorm"), dict(score_kind=STORED)),  # a rule without a kernel: its score is read as stored
])
def test_step_settings_follow_the_config(config, settings):
    made = MomentKVConfig(budget=8, **config).step_settings()
    assert {name: getattr(made, name) for name in settings} == settings


def test_policy_names_come_from_the_registry():
    """Config validation accepts exactly the registered rules, and its error lists them."""
    for name in momentkv.policy_names():
        assert MomentKVConfig(budget=8, policy=name).policy == name
    with pytest.raises(ValueError, match="policy must be one of 'h2o', 'keydiff'"):
        MomentKVConfig(budget=8, policy="lru")
    with pytest.raises(TypeError, match="policy must be a str"):
        MomentKVConfig(budget=8, policy=0)


@pytest.mark.parametrize("length, bucket, prefill_budget, slots", [
    (1, 64, None, 64), (64, 64, None, 64), (65, 64, None, 128), (300, 1, None, 300), (300, 64, 100, 100),
    (50, 64, 100, 64),
])
def test_prompt_slots_are_bucketed_and_capped(length, bucket, prefill_budget, slots):
    config = MomentKVConfig(budget=8, prompt_bucket=bucket, prefill_budget=prefill_budget)
    assert config.prompt_slots(length) == slots


@pytest.mark.parametrize("budget, protect_prompt, window", [
    (32, True, 28), (128, True, 112), (7, True, 7), (8, False, 64), (32, False, 64), (64, False, 64), (128, False, 128),
])
def test_default_recent_window(budget, protect_prompt, window):
    assert MomentKVConfig(budget=budget, protect_prompt=protect_prompt).recent_window == window


def test_prompt_tokens_compete_by_default_with_sinks_and_a_long_window():
    """The default chosen from the evidence at equal memory (docs/results.md, "Choosing the default")."""
    config = MomentKVConfig(budget=32)
    assert (config.protect_prompt, config.sinks, config.recent_window, config.cap_window) == (False, 4, 64, True)


def test_window_may_exceed_budget_only_when_prompt_tokens_compete():
    assert MomentKVConfig(budget=8, protect_prompt=False, recent_window=100).recent_window == 100
    with pytest.raises(ValueError, match=r"recent_window must be an int in \[0, 8\]"):
        MomentKVConfig(budget=8, recent_window=100, protect_prompt=True)


PUBLISHED = {
    "window": dict(policy="window", protect_prompt=True),
    "streamingllm": dict(policy="window", protect_prompt=False, sinks=4),
    "h2o": dict(policy="momentum", alpha=1.0, bias_correction=False, recent_window=32, prefill_vote=0.0,
                protect_prompt=True),
    "tova": dict(policy="momentum", alpha=0.0, bias_correction=False, recent_window=0, scope="head",
                 protect_prompt=True),
    "tova-layer": dict(alpha=0.0, recent_window=0, scope="layer"),
    "snapkv": dict(policy="momentum", alpha=1.0, bias_correction=False, recent_window=32, prefill_vote=0.0,
                   protect_prompt=True),
    "random": dict(policy="random", prefill_vote=0.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_are_the_published_rules_and_take_overrides(name):
    from momentkv.evals.methods import method
    from momentkv.presets import PRESETS

    preset = PRESETS[name]
    config = preset(64)
    assert config.budget == 64 and config.correction == "none"
    assert config.prefill_carry == 0, "published rules score each prompt token alone"
    assert {key: getattr(config, key) for key in PUBLISHED[name]} == PUBLISHED[name]
    assert method(name).config(64) == config, "the evaluation's baseline is not the preset users get"
    assert preset(64, correction="moments").correction == "moments"
    with pytest.raises(ValueError, match="alpha"):
        preset(64, alpha=2.0)
