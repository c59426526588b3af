"""A budgeted layer's buffers as one object, and the typed entry points of the ops on it.

The cache, the benchmarks and the profiler call the ops only through these functions, with named
parameters; the positional order of each op's schema is written here and in the op itself, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .decode_step import write_token
from .kernels import Route, call


@dataclass
class LayerState:
    """Every tensor of one budgeted layer, all of fixed size and address ([B, H, S] per slot, S = P + budget + 1).

    keys/values [B, H, S, Dk/Dv]; valid, evictable bool; importance, normalizer fp32 (the momentum score and
    its bias-correction EMA); positions int64 (the token each slot holds); the evicted set's moments n [B, H],
    mu_k, mu_v, comoment [B, H, Dv, Dk] and value_range [B, H, 2, Dv] (fp32); free_slot int64 [B, H] (the slot
    the next token overwrites once over budget); decode_len, seen int64 scalars (decode tokens written, tokens seen).
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self) -> LayerState:
        return LayerState(*(t.clone() for t in self.tensors()))

    @property
    def moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.n, self.mu_k, self.mu_v, self.comoment


def step(state: LayerState, query: Tensor, key: Tensor, value: Tensor, *, scale: float, alpha: float,
         corrected: bool, moment_weight: float, sinks: Tensor | None, budget: int, policy: int, bias_correction: bool,
         recent_window: int, cap_window: bool, shared: bool, seed: int, fold: bool, route: Route = "kernel") -> Tensor:
    """``momentkv::decode_step``: write the new token (key, value [B, H, 1, D]), attend with query [B, Hq, Dk] as
    :func:`attend`, evict as :func:`evict`: a layer's whole decode step in one call. Returns [B, Hq, Dv]."""
    return call("decode_step", query, key, value, state.keys, state.values, state.valid, state.evictable,
                state.importance, state.normalizer, state.positions, *state.moments, state.value_range,
                state.free_slot, state.decode_len, state.seen, scale, alpha, corrected, moment_weight, sinks, budget,
                policy, bias_correction, recent_window, cap_window, shared, seed, fold, route=route)


def write(state: LayerState, key: Tensor, value: Tensor, *, budget: int) -> None:
    """Write the new token into its slot (``decode_step``'s first part, for a step split around a collective)."""
    write_token(state.keys, state.values, state.valid, state.importance, state.normalizer, state.positions,
                state.free_slot, state.decode_len, state.seen, key, value, budget)


def attend(state: LayerState, query: Tensor, *, scale: float, alpha: float, corrected: bool,
           moment_weight: float = 0.0, sinks: Tensor | None = None, route: Route = "kernel") -> Tensor:
    """``momentkv::decode_attention``: query [B, Hq, Dk] against the layer's slots (and, if ``corrected``, the
    evicted set's virtual key); updates each slot's momentum score. Returns [B, Hq, Dv]. ``route`` as in
    :func:`momentkv.ops.kernels.call`."""
    return call("decode_attention", query, state.keys, state.values, state.valid, *state.moments, state.importance,
                state.normalizer, scale, alpha, corrected, moment_weight, sinks, state.value_range, route=route)


def evict(state: LayerState, *, budget: int, policy: int, bias_correction: bool, recent_window: int,
          cap_window: bool, shared: bool, seed: int, fold: bool, rank: Tensor | None = None,
          route: Route = "kernel") -> None:
    """``momentkv::evict``: once more than ``budget`` decode tokens are written, drop each head's last slot in the
    keep order (one per sequence if ``shared``) and, if ``fold``, add it to the moments. ``rank``: the keep order
    computed outside (``selection.eviction_rank`` over every tensor-parallel rank's heads)."""
    call("evict", state.keys, state.values, state.valid, state.evictable, state.importance, state.normalizer,
         state.positions, *state.moments, state.free_slot, state.decode_len, state.seen, budget, policy,
         bias_correction, recent_window, cap_window, shared, seed, fold, state.value_range, rank, route=route)


def score_prompt(query: Tensor, keys: Tensor, key_valid: Tensor, *, scale: float, alpha: float,
                 route: Route = "kernel") -> tuple[Tensor, Tensor]:
    """``momentkv::prefill_scores``: (importance, normalizer) [B, H, L] of prompt keys [B, H, L, Dk] from the last
    prompt queries [B, Hq, W, Dk]; key_valid bool [B, L]."""
    return call("prefill_scores", query, keys, key_valid, scale, alpha, route=route)
