"""What a budgeted layer's decode step reads: its buffers (:class:`LayerState`) and its settings
(:class:`StepSettings`). The decode ops' parameters are these two objects' fields (``ops/signature.py``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class LayerState:
    """Every tensor of one budgeted layer, all of fixed size and address ([B, H, S] per slot, S = P + budget + 1).

    keys/values [B, H, S, Dk/Dv]; valid, evictable bool; importance, normalizer fp32 (the slot's score and the
    same recurrence on ones, its bias correction); positions int64 (the token each slot holds); the evicted set's
    moments n [B, H], mu_k, mu_v, comoment [B, H, Dv, Dk] and value_range [B, H, 2, Dv] (fp32); free_slot int64
    [B, H] (the slot the next token overwrites once over budget); decode_len, seen int64 scalars (decode tokens
    written, tokens seen).
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    evictable: Tensor
    importance: Tensor
    normalizer: Tensor
    positions: Tensor
    n: Tensor
    mu_k: Tensor
    mu_v: Tensor
    comoment: Tensor
    value_range: Tensor
    free_slot: Tensor
    decode_len: Tensor
    seen: Tensor

    @classmethod
    def allocate(cls, batch: int, heads: int, slots: int, key_dim: int, value_dim: int, key_dtype: torch.dtype,
                 value_dtype: torch.dtype, device: torch.device) -> LayerState:
        """Zeroed buffers: no slot valid, no token seen, nothing evicted. Keys and values may differ in
        dtype (under autocast, RoPE returns fp32 keys beside bf16 values)."""
        shape = (batch, heads, slots)
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            keys=torch.zeros(*shape, key_dim, dtype=key_dtype, device=device),
            values=torch.zeros(*shape, value_dim, dtype=value_dtype, device=device),
            valid=torch.zeros(shape, dtype=torch.bool, device=device),
            evictable=torch.zeros(shape, dtype=torch.bool, device=device),
            importance=torch.zeros(shape, **f32),
            normalizer=torch.zeros(shape, **f32),
            positions=torch.zeros(shape, dtype=torch.int64, device=device),
            n=torch.zeros(batch, heads, **f32),
            mu_k=torch.zeros(batch, heads, key_dim, **f32),
            mu_v=torch.zeros(batch, heads, value_dim, **f32),
            comoment=torch.zeros(batch, heads, value_dim, key_dim, **f32),
            value_range=torch.zeros(batch, heads, 2, value_dim, **f32),  # low, high of the evicted values (and 0)
            free_slot=torch.zeros(batch, heads, dtype=torch.int64, device=device),
            decode_len=torch.zeros((), dtype=torch.int64, device=device),
            seen=torch.zeros((), dtype=torch.int64, device=device),
        )

    def tensors(self) -> list[Tensor]:
        return [getattr(self, field.name) for field in fields(self)]

    def named(self) -> dict[str, Tensor]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self) -> LayerState:
        return LayerState(*(t.clone() for t in self.tensors()))


@dataclass(frozen=True)
class StepSettings:
    """A budgeted layer's decode-step settings, built once from its configuration
    (``MomentKVConfig.step_settings``): the scalars every decode op takes.

    alpha: decay of the slot scores' momentum and of their normaliser. moments: whether the evicted set's
    moments are kept (folded at eviction) and attended as a virtual key. moment_weight: moment-informed
    eviction. budget: decode slots. score_kind: how eviction reads a slot's score (``ops.scores``).
    recent_window, cap_window: the protected newest tokens, capped at ``window_cap`` of the evictable slots.
    layer_scope: one victim per sequence for every head of the layer. seed: of the hashed score."""

    alpha: float
    moments: bool
    moment_weight: float
    budget: int
    score_kind: int
    recent_window: int
    cap_window: bool
    layer_scope: bool
    seed: int
