"""The budgeted cache: static buffers of ``P + B + 1`` slots per layer and KV head.

gpt-fast style: plain tensors allocated once, marked static, mutated in place; all
counters are device tensors, so one compiled decode step serves a whole generation
and CUDA graphs see fixed addresses. Slot ``[0, P)`` hold the prompt, ``[P, P+B]``
the decode tokens; keys are stored after RoPE, so a slot's index never matters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin
from transformers.utils import is_torchdynamo_compiling

from momentkv.config import MomentKVConfig, window_cap
from momentkv.ops import eviction_score, merge_range, merge_set, prefill_scores

from .support import BOUNDED, BUDGETED, layer_types


class PendingPrompt(NamedTuple):
    """A layer's scored prompt, held until every layer has scored its own (the vote needs them all)."""

    keys: Tensor
    values: Tensor
    key_valid: Tensor  # [B, L]
    positions: Tensor  # [B, H, L]
    importance: Tensor
    normalizer: Tensor
    score: Tensor | None  # the selection score [B, H, L]; None if the whole prompt fits its slots


def head_share(score: Tensor) -> Tensor:
    """Each score [B, H, L] as a share of its head's total: comparable across heads and layers."""
    return score / score.sum(-1, keepdim=True).clamp_min(1e-20)


class BudgetedLayer(CacheLayerMixin):
    """One full-attention layer's budgeted cache. Its attention is computed by
    :func:`momentkv.patches.attention` through :meth:`attend`."""

    is_compileable = True
    is_sliding = False
    BUFFERS = ("keys", "values", "valid", "evictable", "importance", "normalizer", "positions",
               "n", "mu_k", "mu_v", "comoment", "value_range", "free_slot", "decode_len", "seen")

    def __init__(self, config: MomentKVConfig, prompt_slots: int):
        super().__init__()
        self.config = config
        self.prompt_slots = prompt_slots
        self.num_slots = prompt_slots + config.budget + 1
        self.prefilled = False
        self._pending: tuple[Tensor, Tensor] | PendingPrompt | None = None

    # -- allocation -----------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.inference = torch.is_inference_mode_enabled()  # inference tensors cannot be updated outside that mode
        self.batch_size, self.num_heads = key_states.shape[:2]
        b, h, s = self.batch_size, self.num_heads, self.num_slots
        dk, dv = key_states.shape[-1], value_states.shape[-1]
        f32 = dict(dtype=torch.float32, device=self.device)
        self.keys = torch.zeros(b, h, s, dk, dtype=self.dtype, device=self.device)
        # keys and values may differ in dtype (under autocast, RoPE returns fp32 keys beside bf16 values)
        self.values = torch.zeros(b, h, s, dv, dtype=value_states.dtype, device=self.device)
        self.valid = torch.zeros(b, h, s, dtype=torch.bool, device=self.device)
        self.evictable = torch.zeros(b, h, s, dtype=torch.bool, device=self.device)
        self.importance = torch.zeros(b, h, s, **f32)
        self.normalizer = torch.zeros(b, h, s, **f32)
        self.positions = torch.zeros(b, h, s, dtype=torch.int64, device=self.device)
        self.n = torch.zeros(b, h, **f32)
        self.mu_k = torch.zeros(b, h, dk, **f32)
        self.mu_v = torch.zeros(b, h, dv, **f32)
        self.comoment = torch.zeros(b, h, dv, dk, **f32)
        self.value_range = torch.zeros(b, h, 2, dv, **f32)  # low, high of the evicted values (and 0)
        self.free_slot = torch.zeros(b, h, dtype=torch.int64, device=self.device)
        self.decode_len = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = torch.zeros((), dtype=torch.int64, device=self.device)
        if not is_torchdynamo_compiling():
            for buffer in self.buffers():
                torch._dynamo.mark_static_address(buffer)
        self.is_initialized = True

    def buffers(self) -> list[Tensor]:
        """Every tensor this layer owns (all of fixed size and address)."""
        if not self.is_initialized:
            return []
        return [getattr(self, name) for name in self.BUFFERS]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def reset(self) -> None:
        for buffer in self.buffers():
            buffer.zero_()
        self.prefilled = False
        self._pending = None

    # -- transformers' cache protocol -------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.prefilled:
            # The prompt is attended as it is; the attention function knows the padding and
            # finishes the prefill (scoring, compression, writing the slots).
            self._pending = (key_states, value_states)
            return key_states, value_states
        if key_states.shape[-2] != 1:
            raise ValueError(
                f"momentkv decodes one token per step after the prompt, got {key_states.shape[-2]} new tokens; "
                "assisted/speculative generation, chunked prefill and multi-token continuation are not supported"
            )
        budget = self.config.budget
        target = torch.where(self.decode_len <= budget, self.prompt_slots + self.decode_len, self.free_slot)
        slot = target[..., None]
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, 1, self.keys.shape[-1]), key_states)
        self.values.scatter_(2, slot[..., None].expand(-1, -1, 1, self.values.shape[-1]), value_states)
        self.valid.scatter_(2, slot, True)
        self.importance.scatter_(2, slot, 0.0)
        self.normalizer.scatter_(2, slot, 0.0)
        self.positions.scatter_(2, slot, self.seen.expand_as(slot))
        self.seen.add_(1)
        self.decode_len.add_(1)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Decode attention reads ``valid``, not the mask; the mask only matters for the prompt.
        return (self.num_slots, 0) if self.prefilled else (query_length, 0)

    def get_seq_length(self) -> Tensor | int:
        """Tokens seen (padding included, as transformers counts them), not tokens stored."""
        return self.seen if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1  # generation length is unbounded: the cache evicts instead of growing

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("momentkv does not support beam search (num_beams > 1); use greedy search or sampling")

    # -- prefill --------------------------------------------------------------------
    def score_prompt(self, query: Tensor, key_valid: Tensor, scale: float) -> None:
        """Score the prompt's tokens (if a choice is to be made) and hold the prompt until :meth:`write_prompt`.

        query [B, Hq, L, D] (the prompt's queries); key_valid bool [B, L] (False on padding)."""
        keys, values = self._pending
        cfg = self.config
        b, h, length, _ = keys.shape
        if length > self.prompt_slots and cfg.prefill_budget is None:
            raise ValueError(f"prompt of {length} tokens does not fit the {self.prompt_slots} prompt slots of this cache")
        positions = torch.arange(length, device=keys.device).expand(b, h, length)
        score = None
        if length > self.prompt_slots or not cfg.protect_prompt:
            window = min(cfg.observation_window, length)
            importance, normalizer = prefill_scores(query[:, :, -window:], keys, key_valid, scale, cfg.alpha)
        else:
            importance = normalizer = torch.zeros(b, h, length, dtype=torch.float32, device=keys.device)
        if length > self.prompt_slots:
            seen, draw = (torch.full((), value, dtype=torch.int64, device=keys.device) for value in (length, 0))
            score = eviction_score(cfg.policy_id, importance, normalizer, positions, seen, draw, cfg.bias_correction,
                                   cfg.seed)
            score = score.masked_fill(~key_valid[:, None, :], 0.0)
        self._pending = PendingPrompt(keys, values, key_valid, positions, importance, normalizer, score)

    @property
    def awaits_vote(self) -> bool:
        """Whether this layer's prompt selection waits for the model-wide vote (``prefill_vote > 0``)."""
        return self._pending.score is not None and self.config.prefill_vote > 0

    def vote(self) -> Tensor:
        """[B, L]: this layer's selection scores as a share of each head's total, averaged over heads."""
        return head_share(self._pending.score).mean(1)

    def write_prompt(self, vote: Tensor | None = None) -> None:
        """Write the prompt into the prompt slots, compressing it to ``prefill_budget`` if it is longer.

        vote [B, L]: the model-wide vote (:meth:`MomentKVCache.finish_prefill`), blended into the score
        with weight ``prefill_vote``."""
        keys, values, key_valid, positions, importance, normalizer, score = self._pending
        self._pending = None
        cfg = self.config
        b, h, length, _ = keys.shape
        p = self.prompt_slots
        valid = key_valid[:, None, :].expand(b, h, length)
        sink = valid & (valid.cumsum(-1) <= cfg.sinks)
        if score is not None:
            if vote is not None:
                score = (1 - cfg.prefill_vote) * head_share(score) + cfg.prefill_vote * vote[:, None, :]
            # Sinks first, then the recent window newest first, then by score. As at decode, the window
            # covers at most 7/8 of the evictable slots, so the score (the vote) always chooses some.
            choosable = p - cfg.sinks
            window = min(cfg.recent_window, window_cap(choosable))
            recent = positions >= length - window
            rank = torch.where(recent, 1e12 + positions.double(), score.double())
            rank = torch.where(sink, 2e12, rank).masked_fill(~valid, float("-inf"))
            keep = rank.topk(p, dim=-1).indices.sort(dim=-1).values
            kept = torch.zeros_like(valid).scatter_(-1, keep, True)
            if cfg.corrected:
                merge_set(self.n, self.mu_k, self.mu_v, self.comoment, keys, values, valid & ~kept)
                merge_range(self.value_range, values, valid & ~kept)
            keys = keys.gather(2, keep[..., None].expand(-1, -1, -1, keys.shape[-1]))
            values = values.gather(2, keep[..., None].expand(-1, -1, -1, values.shape[-1]))
            valid, sink, positions = valid.gather(-1, keep), sink.gather(-1, keep), keep
            importance, normalizer = importance.gather(-1, keep), normalizer.gather(-1, keep)
            length = p
        self.keys[:, :, :length] = keys
        self.values[:, :, :length] = values
        self.valid[:, :, :length] = valid
        self.positions[:, :, :length] = positions
        self.importance[:, :, :length] = importance
        self.normalizer[:, :, :length] = normalizer
        self.evictable[:, :, :length] = valid & ~sink & (not cfg.protect_prompt)
        self.evictable[:, :, p:] = True
        self.seen.fill_(key_valid.shape[-1])
        self.prefilled = True


class MomentKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are budgeted; sliding-window, chunked,
    linear-attention and convolution layers keep transformers' own static layers (already bounded)."""

    def __init__(self, model_config, config: MomentKVConfig, prompt_slots: int, dtype: torch.dtype | None = None):
        kinds, kinds_kwargs = layer_types(model_config)
        layers: list[CacheLayerMixin] = []
        for kind, kwargs in zip(kinds, kinds_kwargs):
            if kind == BUDGETED:
                layers.append(BudgetedLayer(config, prompt_slots))
            elif kind in BOUNDED:  # transformers' own static layer: a window, a recurrent state, or nothing
                layers.append(STATIC_LAYER_TYPE_MAPPING[kind](max_cache_len=kwargs.get("sliding_window", 1), **kwargs))
            else:  # patch refuses such models (patches/support.py); a config changed since patching lands here
                raise ValueError(f"momentkv cannot budget {kind!r} layers (model type {model_config.model_type!r})")
        super().__init__(layers=layers)
        self.config = config
        self.prompt_slots = prompt_slots
        # The compute dtype of the call that made this cache (the model's, or autocast's): under autocast
        # keys and values may come in different dtypes, so the buffers' dtypes alone cannot say what fits.
        self.call_dtype = dtype

    @property
    def budgeted_layers(self) -> list[BudgetedLayer]:
        return [layer for layer in self.layers if isinstance(layer, BudgetedLayer)]

    def nbytes(self) -> int:
        """Bytes held by the budgeted layers (fixed once allocated)."""
        return sum(layer.nbytes() for layer in self.budgeted_layers)

    def finish_prefill(self, layer: BudgetedLayer, query: Tensor, key_valid: Tensor, scale: float) -> None:
        """Score ``layer``'s prompt and write it, or hold it until the last budgeted layer has scored its own:
        then the deeper layers' scores (from ``vote_depth`` of the way down) vote on the tokens every layer keeps."""
        layer.score_prompt(query, key_valid, scale)
        if not layer.awaits_vote:
            layer.write_prompt()
        elif layer is self.budgeted_layers[-1]:
            layers = self.budgeted_layers
            voters = layers[int(self.config.vote_depth * len(layers)):]
            vote = torch.stack([voter.vote() for voter in voters]).mean(0)
            for each in layers:
                each.write_prompt(vote)

    def fits(self, batch_size: int, prompt_slots: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a new generation of this shape fits these buffers (reusing them reuses a compiled step too)."""
        layer = self.budgeted_layers[0] if self.budgeted_layers else None
        if layer is None or not layer.is_initialized:
            return False
        return (
            layer.batch_size == batch_size
            and layer.prompt_slots >= prompt_slots
            and self.call_dtype == dtype
            and layer.device == device
            and layer.inference == torch.is_inference_mode_enabled()
        )
