"""The budgeted cache: static buffers of ``P + B + 1`` slots per layer and KV head.

gpt-fast style: plain tensors allocated once, marked static, mutated in place; all
counters are device tensors, so one compiled decode step serves a whole generation
and CUDA graphs see fixed addresses. Slot ``[0, P)`` hold the prompt, ``[P, P+B]``
the decode tokens; keys are stored after RoPE, so a slot's index never matters.

Each budgeted layer owns its cache work, as transformers' cache layers do: ``update`` takes the new token,
:meth:`BudgetedLayer.decode` writes it, attends and evicts, :meth:`BudgetedLayer.prefill` scores and writes the
prompt.
The attention function (``patches/attention.py``) only routes to them and checks the call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, LinearAttentionLayer
from transformers.utils import is_torchdynamo_compiling

from momentkv.config import MomentKVConfig
from momentkv.ops.kernels import bind, call
from momentkv.ops.moments import merge_range, merge_set
from momentkv.ops.prefill import prefill_scores
from momentkv.ops.selection import eviction_rank, prompt_score, select_prompt, sink_mask, vote
from momentkv.ops.signature import named
from momentkv.ops.state import LayerState
from momentkv.policies import policy

from .parallel import ONE_PROCESS, HeadGroup
from .rule import decode_scores, prompt_scores
from .support import BOUNDED, BUDGETED, HYBRID, UnsupportedAttention, layer_types


OUTSIDE_GENERATE = (
    "a MomentKVCache is filled and read only inside generate() of a model patched by momentkv (momentkv.patch): its "
    "decode step runs there. A forward loop of one's own over it, or the cache generate returned fed back into the "
    "model, would attend to the new token alone. Use generate: a LogitsProcessor, a StoppingCriteria or a streamer "
    "sees every step, and a conversation continues by generating from the whole conversation again")


@dataclass
class PendingPrompt:
    """A layer's prompt between ``update`` and the write into its slots. With a vote it waits, scored,
    until every budgeted layer has scored its own."""

    keys: Tensor
    values: Tensor
    key_valid: Tensor | None = None  # [B, L], once scored
    importance: Tensor | None = None  # [B, H, L] prefill scores, once scored
    normalizer: Tensor | None = None
    score: Tensor | None = None  # [B, H, L] the selection score; None if the whole prompt fits its slots


class PromptVote:
    """The model-wide vote on which prompt tokens every budgeted layer keeps (``prefill_vote``): the layers wait,
    scored, until the last has scored its own; then the deeper ones (from ``vote_depth`` of the way down) vote."""

    def __init__(self, config: MomentKVConfig, heads: HeadGroup):
        self.config, self.heads = config, heads
        self.layers: list[BudgetedLayer] = []

    def scored(self, layer: BudgetedLayer) -> None:
        """``layer`` has scored its prompt; after the last budgeted layer, every layer writes the voted selection."""
        if layer is not self.layers[-1]:
            return
        voters = self.layers[int(self.config.vote_depth * len(self.layers)):]
        model_vote = vote([voter.pending.score for voter in voters], self.heads.sum, self.heads.size)
        for each in self.layers:
            each.write_prompt(model_vote)


class BudgetedLayer(CacheLayerMixin):
    """One full-attention layer's budgeted cache: its buffers (:class:`LayerState`), its decode-step settings,
    its eviction rule, and transformers' cache protocol."""

    is_compileable = True
    is_sliding = False

    def __init__(self, config: MomentKVConfig, prompt_slots: int, index: int, prompt_vote: PromptVote,
                 heads: HeadGroup = ONE_PROCESS):
        super().__init__()
        self.config = config
        self.prompt_slots = prompt_slots
        self.num_slots = prompt_slots + config.budget + 1
        self.settings = config.step_settings()  # built once: the step runs per layer and token
        rule = policy(config.policy)
        self.rule = None if rule.kernel else rule.bind(config, index)  # None: the fused kernels compute the rule
        self.prompt_vote = prompt_vote
        self.heads = heads  # the tensor-parallel ranks holding the layer's other KV heads
        self.prefilled = False
        self.pending: PendingPrompt | None = None
        self.state: LayerState | None = None
        self.token: tuple[Tensor, Tensor] | None = None  # the new key and value, from update until decode writes them
        self.unattended = False  # a token was taken and its attention has not run yet (eager only)
        self.in_generation = False  # inside the patched generate this cache serves (MomentKVCache.generating)

    # -- allocation -----------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.inference = torch.is_inference_mode_enabled()  # inference tensors cannot be updated outside that mode
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.state = LayerState.allocate(self.batch_size, self.num_heads, self.num_slots, key_states.shape[-1],
                                         value_states.shape[-1], key_states.dtype, value_states.dtype, self.device)
        self.keys, self.values = self.state.keys, self.state.values  # what transformers reads of a layer
        self.ops = {name: bind(name, self.state, self.settings) for name in ("decode_step", "write")}
        if not is_torchdynamo_compiling():
            for buffer in self.buffers():
                torch._dynamo.mark_static_address(buffer)
        self.is_initialized = True

    def holds(self, key_states: Tensor, value_states: Tensor) -> bool:
        """Whether this layer's buffers take tokens like these (batch, heads, widths, dtypes, device)."""
        keys, values = self.state.keys, self.state.values
        return (keys.shape[:2] == key_states.shape[:2] and keys.shape[-1] == key_states.shape[-1]
                and values.shape[-1] == value_states.shape[-1] and keys.dtype == key_states.dtype
                and values.dtype == value_states.dtype and keys.device == key_states.device)

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
        self.token = None
        self.unattended = False

    # -- transformers' cache protocol -------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """The prompt is held (and attended as it is) until :meth:`prefill`; a decode token is held until
        :meth:`decode` writes it into its slot (in the step's one op), and the layer's buffers are returned for it."""
        if not is_torchdynamo_compiling() and not self.in_generation:
            raise ValueError(OUTSIDE_GENERATE)
        if not self.is_initialized or not self.prefilled and not self.holds(key_states, value_states):
            self.lazy_initialization(key_states, value_states)
        if not self.prefilled:
            self.pending = PendingPrompt(key_states, value_states)
            return key_states, value_states
        if key_states.shape[-2] != 1:
            raise ValueError(
                f"momentkv decodes one token per step after the prompt, got {key_states.shape[-2]} new tokens; "
                "assisted/speculative generation, chunked prefill and multi-token continuation are not supported"
            )
        if not is_torchdynamo_compiling():
            if self.unattended:
                raise UnsupportedAttention(
                    "momentkv cannot budget this model: the token a budgeted cache layer received last step never "
                    "reached momentkv's attention (the model attends outside transformers' attention interface)")
            self.unattended = True
        self.token = key_states, value_states
        return self.state.keys, self.state.values

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

    # -- decoding ---------------------------------------------------------------------
    def decode(self, query: Tensor, scale: float, sink_logits: Tensor | None = None, softcap: float = 0.0) -> Tensor:
        """Write the new token (held since ``update``), attend its query [B, Hq, 1, Dk] over the layer, then
        evict if over budget. Returns [B, 1, Hq, Dv]. sink_logits [Hq]: the model's learned attention-sink logits;
        softcap: its attention-logit soft cap (0: none).

        With the rule's fused kernels and one process this is one op; a registered rule runs between the
        attention and the eviction, and a layer-scope victim under tensor parallelism is chosen over every
        rank's heads between them."""
        self.unattended = False
        (key, value), self.token = self.token, None
        st, settings, query = self.state, self.settings, query[:, :, 0]
        split_rank = settings.layer_scope and self.heads.size > 1
        if self.rule is None and not split_rank:
            return self.ops["decode_step"](query=query, key=key, value=value, scale=scale, softcap=softcap,
                                           sink_logits=sink_logits).unsqueeze(1)
        self.ops["write"](key=key, value=value)
        # A registered rule is given this step's attention alone: the attention's momentum update of a zeroed
        # score is exactly the probability (the normaliser is updated as for every rule).
        attention = st.importance if self.rule is None else torch.zeros_like(st.importance)
        out = call("decode_attention", st, settings, query=query, scale=scale, softcap=softcap,
                   sink_logits=sink_logits, importance=attention)
        if self.rule is not None:
            decode_scores(self.rule, st, attention)
        rank = None
        if split_rank:
            rank = eviction_rank(**named(st, settings), combine=self.heads.combine, ranks=self.heads.size)
        call("evict", st, settings, rank=rank)
        return out.unsqueeze(1)

    # -- prefill --------------------------------------------------------------------
    def prefill(self, query: Tensor, key_valid: Tensor, scale: float, softcap: float = 0.0) -> None:
        """Score the prompt held since ``update`` and write it into the prompt slots, compressed to the prefill
        budget if longer; with a vote, after the last budgeted layer has scored its own.

        query [B, Hq, L, D] (the prompt's queries); key_valid bool [B, L] (False on padding); softcap: the
        attention-logit soft cap (0: none)."""
        self.score_prompt(query, key_valid, scale, softcap)
        if self.pending.score is not None and self.config.prefill_vote > 0:
            self.prompt_vote.scored(self)
        else:
            self.write_prompt()

    def score_prompt(self, query: Tensor, key_valid: Tensor, scale: float, softcap: float = 0.0) -> None:
        """Score the prompt's tokens, if a choice is to be made (held until :meth:`write_prompt`)."""
        pending, cfg = self.pending, self.config
        b, h, length, _ = pending.keys.shape
        if length > self.prompt_slots and cfg.prefill_budget is None:
            raise ValueError(f"prompt of {length} tokens does not fit the {self.prompt_slots} prompt slots of this cache")
        pending.key_valid = key_valid
        if length > self.prompt_slots or not cfg.protect_prompt:
            observed = query[:, :, -min(cfg.observation_window, length):]
            if self.rule is None:
                scores = prefill_scores(observed, pending.keys, key_valid, scale, cfg.alpha, softcap)
            else:
                scores = prompt_scores(self.rule, observed, pending.keys, key_valid, scale, cfg.alpha, softcap)
            pending.importance, pending.normalizer = scores
        else:
            pending.importance = pending.normalizer = torch.zeros(b, h, length, dtype=torch.float32,
                                                                  device=pending.keys.device)
        if length > self.prompt_slots:
            pending.score = prompt_score(self.settings.score_kind, pending.importance, pending.normalizer, key_valid,
                                         cfg.seed, cfg.prefill_carry)

    def write_prompt(self, model_vote: Tensor | None = None) -> None:
        """Write the prompt into the prompt slots, compressed to ``prefill_budget`` if it is longer.

        model_vote [B, L]: the model-wide vote (:class:`PromptVote`)."""
        pending, cfg, st = self.pending, self.config, self.state
        self.pending = None
        keys, values, importance, normalizer = pending.keys, pending.values, pending.importance, pending.normalizer
        b, h, length, _ = keys.shape
        p = self.prompt_slots
        valid = pending.key_valid[:, None, :].expand(b, h, length)
        positions = torch.arange(length, device=keys.device).expand(b, h, length)
        if pending.score is not None:
            keep = select_prompt(pending.score, valid, p, cfg.sinks, cfg.prefill_recent, cfg.prefill_vote, model_vote)
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


class BudgetedHybridLayer(LinearAttentionLayer, BudgetedLayer):
    """A "hybrid" layer (Falcon-H1, Zamba2): a linear-attention or mamba state beside full attention in one decoder
    layer. transformers' linear-attention layer keeps the state (fixed size already); the attention's keys and
    values are budgeted. Assembled as transformers assembles its own static hybrid layer."""

    def __init__(self, config: MomentKVConfig, prompt_slots: int, index: int, prompt_vote: PromptVote,
                 heads: HeadGroup = ONE_PROCESS, number_of_states: int = 1):
        BudgetedLayer.__init__(self, config, prompt_slots, index, prompt_vote, heads)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:  # the attention's keys and values (update), else a conv/recurrent state
            BudgetedLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, *args, **kwargs)

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        BudgetedLayer.reset(self)

    is_compileable = BudgetedLayer.is_compileable
    get_seq_length = BudgetedLayer.get_seq_length
    get_max_length = BudgetedLayer.get_max_length
    get_mask_sizes = BudgetedLayer.get_mask_sizes
    reorder_cache = BudgetedLayer.reorder_cache


class MomentKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are budgeted; sliding-window, chunked,
    linear-attention and convolution layers keep transformers' own static layers (already bounded)."""

    def __init__(self, model_config, config: MomentKVConfig, prompt_slots: int, compute: tuple | None = None,
                 heads: HeadGroup = ONE_PROCESS):
        kinds, kinds_kwargs = layer_types(model_config)
        prompt_vote = PromptVote(config, heads)
        layers: list[CacheLayerMixin] = []
        for index, (kind, kwargs) in enumerate(zip(kinds, kinds_kwargs)):
            if kind in BUDGETED:
                if kind == HYBRID:
                    layers.append(BudgetedHybridLayer(config, prompt_slots, index, prompt_vote, heads,
                                                      kwargs.get("number_of_states", 1)))
                else:
                    layers.append(BudgetedLayer(config, prompt_slots, index, prompt_vote, heads))
            elif kind in BOUNDED:  # transformers' own static layer: a window, a recurrent state, or nothing
                layers.append(STATIC_LAYER_TYPE_MAPPING[kind](max_cache_len=kwargs.get("sliding_window", 1), **kwargs))
            else:  # patch refuses such models (patches/support.py); a config changed since patching lands here
                raise ValueError(f"momentkv cannot budget {kind!r} layers (model type {model_config.model_type!r})")
        super().__init__(layers=layers)
        prompt_vote.layers = self.budgeted_layers
        self.config = config
        self.prompt_slots = prompt_slots
        # What decided the dtypes of the call that made this cache (the weights' and autocast's): under autocast
        # keys and values may come in different dtypes, so the buffers' dtypes alone cannot say what fits.
        self.compute = compute

    @contextmanager
    def generating(self) -> Iterator[None]:
        """The span of the one generate call this cache serves: only inside it may its layers take tokens."""
        for layer in self.budgeted_layers:
            layer.in_generation = True
        try:
            yield
        finally:
            for layer in self.budgeted_layers:
                layer.in_generation = False

    @property
    def budgeted_layers(self) -> list[BudgetedLayer]:
        return [layer for layer in self.layers if isinstance(layer, BudgetedLayer)]

    def nbytes(self) -> int:
        """Bytes held by the budgeted layers (fixed once allocated)."""
        return sum(layer.nbytes() for layer in self.budgeted_layers)

    def fits(self, batch_size: int, prompt_slots: int, compute: tuple, device: torch.device) -> bool:
        """Whether a new generation of this shape fits these buffers (reusing them reuses a compiled step too)."""
        layer = self.budgeted_layers[0] if self.budgeted_layers else None
        if layer is None or not layer.is_initialized:
            return False
        return (
            layer.batch_size == batch_size
            and layer.prompt_slots >= prompt_slots
            and self.compute == compute
            and layer.device == device
            and layer.inference == torch.is_inference_mode_enabled()
        )
