"""Build a layer's state and settings for op-level tests from the few tensors a test cares about."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from momentkv.ops import LayerState, StepSettings, call
from momentkv.ops.scores import NORMALIZED
from momentkv.ops.signature import named, positional


def layer_state(**given: torch.Tensor) -> LayerState:
    """A :class:`LayerState` holding ``given`` (the tensors themselves, so in-place updates show); the fields not
    given: every slot valid and evictable, positions 0..S-1, nothing evicted, an unbounded value range (so the
    first-order estimate is not clamped), no token seen."""
    keys, values = given["keys"], given["values"]
    b, h, s, dk = keys.shape
    state = LayerState.allocate(b, h, s, dk, values.shape[-1], keys.dtype, values.dtype, keys.device)
    state.valid.fill_(True)
    state.evictable.fill_(True)
    state.positions.copy_(torch.arange(s, device=keys.device).expand(b, h, s))
    state.value_range[:, :, 0] = float("-inf")
    state.value_range[:, :, 1] = float("inf")
    return replace(state, **given)


def step_settings(**overrides: Any) -> StepSettings:
    """Settings of the defaults' kind (momentum with bias correction, moments on, one recent token)."""
    defaults = dict(alpha=0.9, moments=True, moment_weight=0.0, budget=3, score_kind=NORMALIZED, recent_window=1,
                    cap_window=False, layer_scope=False, seed=0)
    return StepSettings(**{**defaults, **overrides})


def split(tensors: dict[str, torch.Tensor]) -> tuple[LayerState, dict[str, torch.Tensor]]:
    """(the state of the LayerState fields in ``tensors``, the rest: query, key, value...)."""
    fields = set(LayerState.__dataclass_fields__)
    return (layer_state(**{k: v for k, v in tensors.items() if k in fields}),
            {k: v for k, v in tensors.items() if k not in fields})


def run(name: str, tensors: dict[str, torch.Tensor], route: str = "dispatcher", **per_call: Any):
    """Op ``name`` on ``tensors`` (state fields and query/key/value) with :func:`step_settings` of the
    ``per_call`` names that are settings, the rest per call. The dispatcher route runs the registered kernel
    (the fused one on CPU)."""
    settings = {k: per_call.pop(k) for k in list(per_call) if k in StepSettings.__dataclass_fields__}
    state, rest = split(tensors)
    return call(name, state, step_settings(**settings), route=route, **rest, **per_call)


def op_arguments(tensors: dict[str, torch.Tensor], **per_call: Any) -> tuple:
    """The positional arguments of a decode op (for ``torch.library.opcheck``), as :func:`run` builds them."""
    settings = {k: per_call.pop(k) for k in list(per_call) if k in StepSettings.__dataclass_fields__}
    state, rest = split(tensors)
    return positional(named(state, step_settings(**settings), **rest, **per_call))
