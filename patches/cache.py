"""The budgeted cache: static buffers of ``P + B + 1`` slots per layer and KV head.

gpt-fast style: plain tensors allocated once, marked static, mutated in place; all
counters are device tensors, so one compiled decode step serves a whole generation
and CUDA graphs see fixed addresses. Slot ``[0, P)`` hold the prompt, ``[P, P+B]``
the decode tokens; keys are stored after RoPE, so a slot's index never matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin
from transformers.utils import is_torchdynamo_compiling

from momentkv.config import MomentKVConfig
from momentkv.ops.layer import LayerState, score_prompt
from momentkv.ops.moments import merge_range, merge_set
from momentkv.ops.selection import prompt_score, select_prompt, sink_mask, vote

from .parallel import ONE_PROCESS, HeadGroup
from .support import BOUNDED, BUDGETED, UnsupportedAttention, layer_types


@dataclass
class PendingPrompt:
    """A layer's prompt between its attention and the write into its slots. With a vote it waits, scored,
    until every budgeted layer has scored its own."""

    keys: Tensor
    values: Tensor
    key_valid: Tensor | None = None  # [B, L], once scored
    importance: Tensor | None = None  # [B, H, L] prefill scores, once scored
    normalizer: Tensor | None = None
    score: Tensor | None = None  # [B, H, L] the selection score; None if the whole prompt fits its slots


class BudgetedLayer(CacheLayerMixin):
    """One full-attention layer's budgeted cache: its buffers (:class:`LayerState`) and transformers'
    cache protocol. Its decode attention is computed by :func:`momentkv.patches.attention.decode_step`."""

    is_compileable = True
    is_sliding = False

    def __init__(self, config: MomentKVConfig, prompt_slots: int):
        super().__init__()
        self.config = config
        self.prompt_slots = prompt_slots
        self.num_slots = prompt_slots + config.budget + 1
        # The decode step's settings (``ops.layer.step``), built once: the step runs per layer and token.
        self.step_settings = dict(alpha=config.alpha, corrected=config.corrected, moment_weight=config.moment_weight,
                                  budget=config.budget, policy=config.policy_id,
                                  bias_correction=config.bias_correction, recent_window=config.recent_window,
                                  cap_window=config.cap_window, shared=config.scope == "layer", seed=config.seed,
                                  fold=config.corrected)
        self.prefilled = False
        self.pending: PendingPrompt | None = None
        self.state: LayerState | None = None
        # The new token's key and value between ``update`` and the attention call, which writes them (eager only:
        # what lets the attention check that it reads this layer's token and that every token gets written).
        self.incoming: tuple[Tensor, Tensor] | None = None

    # -- allocation -----------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.inference = torch.is_inference_mode_enabled()  # inference tensors cannot be updated outside that mode
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.state = LayerState.allocate(self.batch_size, self.num_heads, self.num_slots, key_states.shape[-1],
                                         value_states.shape[-1], key_states.dtype, value_states.dtype, self.device)
        self.keys, self.values = self.state.keys, self.state.values  # what transformers reads of a layer
        if not is_torchdynamo_compiling():
            for buffer in self.buffers():
                torch._dynamo.mark_static_address(buffer)
        self.is_initialized = True

    def buffers(self) -> list[Tensor]:
        """Every tensor this layer owns (all of fixed size and address)."""
        return self.state.tensors() if self.is_initialized else []

    def nbytes(self) -> int:
        return self.state.nbytes() if self.is_initialized else 0

    def reset(self) -> None:
        for buffer in self.buffers():
            buffer.zero_()
        self.prefilled = False
        self.pending = None
        self.incoming = None

    # -- transformers' cache protocol -------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.prefilled:
            # The prompt is attended as it is; the attention function knows the padding and
            # finishes the prefill (scoring, compression, writing the slots).
            self.pending = PendingPrompt(key_states, value_states)
            return key_states, value_states
        if key_states.shape[-2] != 1:
            raise ValueError(
                f"momentkv decodes one token per step after the prompt, got {key_states.shape[-2]} new tokens; "
                "assisted/speculative generation, chunked prefill and multi-token continuation are not supported"
            )
        if not is_torchdynamo_compiling():
            if self.incoming is not None:
                raise UnsupportedAttention(
                    "momentkv cannot budget this model: the token a budgeted cache layer received last step never reached "
                    "momentkv's attention (the model attends outside transformers' attention interface)")
            self.incoming = (key_states, value_states)
        # The decode step (``patches.attention``) writes the token, in the same op as its attention.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Decode attention reads ``valid``, not the mask; the mask only matters for the prompt.
        return (self.num_slots, 0) if self.prefilled else (query_length, 0)

    def get_seq_length(self) -> Tensor | int:
        """Tokens seen (padding included, as transformers counts them), not tokens stored."""
        return self.state.seen if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1  # generation length is unbounded: the cache evicts instead of growing

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("momentkv does not support beam search (num_beams > 1); use greedy search or sampling")

    # -- prefill --------------------------------------------------------------------
    def score_prompt(self, query: Tensor, key_valid: Tensor, scale: float) -> None:
        """Score the prompt's tokens, if a choice is to be made (held until :meth:`write_prompt`).

        query [B, Hq, L, D] (the prompt's queries); key_valid bool [B, L] (False on padding)."""
        pending, cfg = self.pending, self.config
        b, h, length, _ = pending.keys.shape
        if length > self.prompt_slots and cfg.prefill_budget is None:
            raise ValueError(f"prompt of {length} tokens does not fit the {self.prompt_slots} prompt slots of this cache")
        pending.key_valid = key_valid
        if length > self.prompt_slots or not cfg.protect_prompt:
            window = min(cfg.observation_window, length)
            pending.importance, pending.normalizer = score_prompt(query[:, :, -window:], pending.keys, key_valid,
                                                                  scale=scale, alpha=cfg.alpha)
        else:
            pending.importance = pending.normalizer = torch.zeros(b, h, length, dtype=torch.float32,
                                                                  device=pending.keys.device)
        if length > self.prompt_slots:
            pending.score = prompt_score(cfg.policy_id, pending.importance, pending.normalizer, key_valid,
                                         cfg.bias_correction, cfg.seed, cfg.prefill_carry)

    @property
    def awaits_vote(self) -> bool:
        """Whether this layer's prompt selection waits for the model-wide vote (``prefill_vote > 0``)."""
        return self.pending.score is not None and self.config.prefill_vote > 0

    def write_prompt(self, model_vote: Tensor | None = None) -> None:
        """Write the prompt into the prompt slots, compressed to ``prefill_budget`` if it is longer.

        model_vote [B, L]: the model-wide vote (:meth:`MomentKVCache.finish_prefill`)."""
        pending, cfg, st = self.pending, self.config, self.state
        self.pending = None
        keys, values, importance, normalizer = pending.keys, pending.values, pending.importance, pending.normalizer
        b, h, length, _ = keys.shape
        p = self.prompt_slots
        valid = pending.key_valid[:, None, :].expand(b, h, length)
        positions = torch.arange(length, device=keys.device).expand(b, h, length)
        if pending.score is not None:
            keep = select_prompt(pending.score, valid, p, cfg.sinks, cfg.recent_window, cfg.prefill_vote, model_vote)
            if cfg.corrected:
                dropped = valid & ~torch.zeros_like(valid).scatter_(-1, keep, True)
                merge_set(st.n, st.mu_k, st.mu_v, st.comoment, keys, values, dropped)
                merge_range(st.value_range, values, dropped)
            keys = keys.gather(2, keep[..., None].expand(-1, -1, -1, keys.shape[-1]))
            values = values.gather(2, keep[..., None].expand(-1, -1, -1, values.shape[-1]))
            valid, positions = valid.gather(-1, keep), keep
            importance, normalizer = importance.gather(-1, keep), normalizer.gather(-1, keep)
            length = p
        st.keys[:, :, :length] = keys
        st.values[:, :, :length] = values
        st.valid[:, :, :length] = valid
        st.positions[:, :, :length] = positions
        st.importance[:, :, :length] = importance
        st.normalizer[:, :, :length] = normalizer
        st.evictable[:, :, :length] = valid & ~sink_mask(valid, cfg.sinks) & (not cfg.protect_prompt)
        st.evictable[:, :, p:] = True
        st.seen.fill_(pending.key_valid.shape[-1])
        self.prefilled = True


class MomentKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are budgeted; sliding-window, chunked,
    linear-attention and convolution layers keep transformers' own static layers (already bounded)."""

    def __init__(self, model_config, config: MomentKVConfig, prompt_slots: int, dtype: torch.dtype | None = None,
                 heads: HeadGroup = ONE_PROCESS):
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
        self.heads = heads  # the ranks that hold the other KV heads, under tensor parallelism

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
            model_vote = vote([voter.pending.score for voter in voters], self.heads.sum, self.heads.size)
            for each in layers:
                each.write_prompt(model_vote)

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
