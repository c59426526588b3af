"""Every causal-LM architecture of the installed transformers, patched: exact, or refused with a reason.

Each architecture is built from its own config class shrunk to a tiny size (a few layers, one of
each layer kind its full-size config mixes; small widths; a 128-token vocabulary with consistent
special ids), saved as safetensors and loaded back. Then, with nothing evicted, patched greedy
output must equal the unpatched model's token for token (fp32, a left-padded batch of 2, also with
a prefill budget above the prompt); with a small budget the logits must stay finite; ``unpatch``
must restore the model. The only other accepted outcome is a ``ValueError`` from ``patch`` that
names the model type. ``momentkv models`` runs it and writes ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import momentkv

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
NEW_TOKENS = 8
MAX_LAYERS = 4

# Standard size names (each config maps them to its own through ``attribute_map``), set where the config has them.
SIZES = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2,
    # mixture of experts
    moe_intermediate_size=32, shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    intermediate_size_mlp=96, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_group=1, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0,
    # latent attention (MLA): values wider than keys, so that case is always swept
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=24,
    # windows and chunks shorter than a prompt, so that their bounds are exercised
    sliding_window=6, attention_chunk_size=6, rotary_dim=8,
    # recurrent and linear-attention blocks of hybrid models
    mamba_d_state=8, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=32, n_groups=1, mamba_dt_rank=8,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
)


@dataclass
class Outcome:
    """What happened to one architecture: ``exact``, ``refused``, ``untestable``, ``wrong`` or ``crash``."""

    model_type: str
    model_class: str
    outcome: str
    reason: str = ""


def causal_lm_architectures() -> list[tuple[str, str]]:
    """(model type, causal-LM class name) for every entry of transformers' auto mapping."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def _is_index_list(value: Any, layers: int) -> bool:
    """Whether ``value`` lists layer indices (``moe_layers=[0, 2]``) rather than one value per layer."""
    return (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
            and all(a < b for a, b in zip(value, value[1:])) and all(0 <= i < layers for i in value))


def _per_layer(value: Any, layers: int) -> bool:
    """Whether ``value`` holds one entry per layer (``layer_types``, ``no_rope_layers``, a block pattern)."""
    return isinstance(value, (list, str)) and len(value) == layers and not _is_index_list(value, layers)


def shrink_layers(defaults: dict, layers_key: str) -> dict:
    """Fewer layers: the first of each distinct kind the full-size config mixes (at most ``MAX_LAYERS``), with
    every per-layer list cut to them and every list of layer indices renumbered."""
    layers = defaults.get(layers_key)
    if not isinstance(layers, int):
        return {}
    if layers <= 2:
        return {layers_key: layers}  # already small: its per-layer lists stay as they are
    keep = {0, 1}
    for value in defaults.values():
        if _per_layer(value, layers):
            firsts = {repr(kind): index for index, kind in reversed(list(enumerate(value)))}
            keep.update(firsts.values())
    keep = sorted(keep)[:MAX_LAYERS]
    shrunk: dict[str, Any] = {layers_key: len(keep)}
    for name, value in defaults.items():
        if _per_layer(value, layers):
            picked = [value[i] for i in keep]
            shrunk[name] = "".join(picked) if isinstance(value, str) else picked
        elif _is_index_list(value, layers):
            shrunk[name] = [new for new, old in enumerate(keep) if old in value]
    return shrunk


def shrink_periods(defaults: dict) -> dict:
    """Layer patterns given as a period and an offset (Jamba's attention every 8 layers from the 4th): every other
    layer from the second, so that a few layers still mix the kinds."""
    periods = {name: 2 for name, value in defaults.items() if name.endswith("_period") and isinstance(value, int)}
    return {**periods, **{name: 1 for name, value in defaults.items()
                          if name.endswith("_offset") and isinstance(value, int)}}


def _shrink(defaults: dict, config_class: type) -> dict:
    """The constructor arguments of a tiny version of ``defaults`` (a full-size config's ``to_dict``)."""
    attribute_map = getattr(config_class, "attribute_map", {})
    kwargs: dict[str, Any] = {}
    for name, value in SIZES.items():
        real = attribute_map.get(name, name)
        if real in defaults:
            kwargs[real] = value
    if "qk_rope_head_dim" in defaults:  # latent attention: the stored sum is rederived, RoPE runs on its part
        if "qk_head_dim" in defaults:
            kwargs["qk_head_dim"] = SIZES["qk_rope_head_dim"] + SIZES["qk_nope_head_dim"]
        if "head_dim" in defaults:
            kwargs["head_dim"] = SIZES["qk_rope_head_dim"]
    heads, kv_heads = (attribute_map.get(n, n) for n in ("num_attention_heads", "num_key_value_heads"))
    if kv_heads in defaults and defaults[kv_heads] == defaults.get(heads) or "kv_lora_rank" in defaults:
        kwargs[kv_heads] = SIZES["num_attention_heads"]  # multi-head (or latent) attention stays so: no GQA
    kwargs.update(shrink_layers(defaults, attribute_map.get("num_hidden_layers", "num_hidden_layers")))
    kwargs.update(shrink_periods(defaults))
    for name, value in defaults.items():
        if name.endswith(("_token_id", "_token_index")) and isinstance(value, int) and value >= VOCAB:
            kwargs[name] = VOCAB - 1
    kwargs.update(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if "is_decoder" in defaults:
        kwargs["is_decoder"] = True  # encoder architectures offered as causal LMs: the decoder a user would build
    for name, value in defaults.items():
        if isinstance(value, dict) and ("hidden_size" in value or "num_hidden_layers" in value):
            kwargs[name] = {**value, **_shrink_nested(value)}
    return kwargs


def _shrink_nested(defaults: dict) -> dict:
    """A nested sub-config (text, vision, audio) as a plain dict: the same sizes, no class at hand."""
    shrunk = {name: value for name, value in SIZES.items() if name in defaults}
    shrunk.update(shrink_layers(defaults, "num_hidden_layers"))
    if "vocab_size" in defaults:
        shrunk.update(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return shrunk


# Layer mixes of released checkpoints whose config class defaults to none of their attention layers (pure mamba),
# so that the sweep judges the attention the released models have (Bamba-9B, Granite-4.0-H; RecurrentGemma's
# pattern, whose first two layers are recurrent).
LAYER_MIX = {
    "bamba": dict(num_hidden_layers=2, attn_layer_indices=[1]),
    "granitemoehybrid": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
    "recurrent_gemma": dict(num_hidden_layers=3, block_types=["recurrent", "recurrent", "attention"]),
}


def tiny_config(model_type: str, model_class: type):
    """The config of a tiny ``model_type`` model of class ``model_class``."""
    config_class = type(AutoConfig.for_model(model_type))
    if not issubclass(config_class, model_class.config_class):  # a composite config: the class takes a part of it
        config_class = model_class.config_class
    return config_class(**{**_shrink(config_class().to_dict(), config_class), **LAYER_MIX.get(model_type, {})})


def build(model_type: str, class_name: str, folder: Path) -> torch.nn.Module:
    """Build the tiny model at random, save it with safetensors, load it back (fp32, eval mode)."""
    model_class = getattr(transformers, class_name)
    torch.manual_seed(0)
    model_class(tiny_config(model_type, model_class)).save_pretrained(folder, safe_serialization=True)
    return model_class.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two prompts of 12 and 7 tokens, the shorter left-padded."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = PAD, 0
    return ids, mask


def generate(model, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
                          **kwargs)


def _decoded_through_momentkv(model) -> bool:
    cache = momentkv.state_of(model).cache
    return cache is not None and any(layer.state.decode_len.item() > 0 for layer in cache.budgeted_layers)


def check(model_type: str, class_name: str, folder: Path) -> Outcome:
    """Patch a tiny ``model_type`` model and classify what happens (see the module docstring)."""
    def outcome(kind: str, reason: str = "") -> Outcome:
        return Outcome(model_type, class_name, kind, reason)

    try:
        model = build(model_type, class_name, folder)
    except Exception as error:
        return outcome("untestable", f"no tiny model could be built from its config: {_short(error)}")
    try:
        momentkv.unpatch(momentkv.patch(model, budget=NEW_TOKENS, prompt_bucket=8))
    except ValueError as error:
        if model_type not in str(error) and repr(model.config.model_type) not in str(error):
            return outcome("crash", f"patch refused without naming the model type: {_short(error)}")
        return outcome("refused", str(error))
    try:
        ids, mask = prompts()
        with torch.no_grad():
            expected = generate(model, ids, mask).sequences
    except Exception as error:  # the unpatched tiny model itself: nothing momentkv can be judged on
        return outcome("untestable", f"the tiny unpatched model does not generate: {_short(error)}")
    momentkv.patch(model, budget=NEW_TOKENS, prompt_bucket=8)
    try:
        with torch.no_grad():
            got = generate(model, ids, mask).sequences
            if not _decoded_through_momentkv(model):
                return outcome("wrong", "patched, but no layer decoded through the budgeted cache")
            if not torch.equal(got, expected):
                return outcome("wrong", "greedy tokens differ from the unpatched model with nothing evicted")
            momentkv.unpatch(model)
            momentkv.patch(model, budget=NEW_TOKENS, prefill_budget=ids.shape[1] + 4, prompt_bucket=8)
            if not torch.equal(generate(model, ids, mask).sequences, expected):
                return outcome("wrong", "greedy tokens differ with a prefill budget above the prompt")
            momentkv.unpatch(model)
            momentkv.patch(model, budget=2, recent_window=1, protect_prompt=False, sinks=1, prompt_bucket=4)
            logits = generate(model, ids, mask).logits
            if not all(torch.isfinite(step).all() for step in logits):
                return outcome("wrong", "non-finite logits with a small budget")
            momentkv.unpatch(model)
            if not torch.equal(generate(model, ids, mask).sequences, expected):
                return outcome("wrong", "unpatch did not restore the model")
    except Exception as error:
        return outcome("crash", _short(error) + " @ " + _where(error))
    return outcome("exact")


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def sweep(model_types: list[str] | None = None, progress: bool = True) -> list[Outcome]:
    """Check every causal-LM architecture (or those named), each in a fresh temporary folder."""
    chosen = [(t, c) for t, c in causal_lm_architectures() if model_types is None or t in model_types]
    outcomes = []
    for index, (model_type, class_name) in enumerate(chosen):
        with tempfile.TemporaryDirectory() as folder:
            result = check(model_type, class_name, Path(folder))
        outcomes.append(result)
        if progress:
            print(f"[{index + 1}/{len(chosen)}] {model_type}: {result.outcome} {result.reason}", flush=True)
    return outcomes


def refusal_reason(outcome: Outcome) -> str:
    """A refusal's reason without what names the model (its type, a layer, details in parentheses), so that the
    models refused for one reason share one row."""
    text = re.sub(r"^momentkv cannot patch model type '[^']*': ", "", outcome.reason)
    text = re.sub(r"model type '[^']*'", "the model", text)
    text = re.sub(r"layer \d+", "a layer", text)
    return re.sub(r" \([^()]*\)", "", text)


def write_markdown(outcomes: list[Outcome], path: Path) -> None:
    """``docs/models.md``: the counts, the refusals grouped by reason, then one row per architecture."""
    counts: dict[str, int] = {}
    for each in outcomes:
        counts[each.outcome] = counts.get(each.outcome, 0) + 1
    reasons: dict[str, list[str]] = {}
    for each in outcomes:
        if each.outcome == "refused":
            reasons.setdefault(refusal_reason(each), []).append(each.model_type)
    grouped = sorted(reasons.items(), key=lambda item: (-len(item[1]), item[0]))
    lines = [
        "# Supported models",
        "",
        f"Every causal-LM architecture of transformers {transformers.__version__} (torch {torch.__version__}), "
        "patched as a tiny random model and checked by `momentkv models` (`evals/architectures.py`, run in CI by "
        "`tests/test_architectures.py`). **exact**: with nothing evicted, greedy output equals the unpatched "
        "model's token for token (fp32, a left-padded batch of 2, also with a prefill budget above the prompt), "
        "a small budget keeps the logits finite, and `unpatch` restores the model. **refused**: `patch` raises a "
        "`ValueError` naming the model type and why. **untestable**: the sweep could not build a tiny model from the "
        "default config (a limit of its generic shrinking, not a verdict on momentkv; such a model still meets "
        "patch's checks and its trial generation).",
        "",
        "| outcome | architectures |",
        "|---|---|",
        *(f"| {kind} | {count} |" for kind, count in sorted(counts.items())),
        "",
        "Refusals by reason:",
        "",
        "| reason | architectures |",
        "|---|---|",
        *(f"| {reason.replace('|', '/')} | {len(types)}: {', '.join(types)} |" for reason, types in grouped),
        "",
        "| architecture | class | outcome | reason |",
        "|---|---|---|---|",
        *(f"| {o.model_type} | {o.model_class} | {o.outcome} | {o.reason.replace('|', '/')} |" for o in outcomes),
        "",
    ]
    path.write_text("\n".join(lines))


def to_json(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``momentkv models``' options."""
    parser.add_argument("--out", default="docs/models.md", help="markdown table to write")
    parser.add_argument("--json", default=None, help="also write the outcomes as JSON to this file")
    parser.add_argument("--only", default="", help="comma-separated model types (default: every one)")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``momentkv models``: returns the exit code, 1 where an architecture came out wrong or crashed."""
    outcomes = sweep([t for t in args.only.split(",") if t] or None)
    write_markdown(outcomes, Path(args.out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(outcomes), f, indent=2)
    if any(o.outcome in ("wrong", "crash") for o in outcomes):
        return 1
    return 0
