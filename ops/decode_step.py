"""``momentkv::decode_step``: a budgeted layer's whole decode step as one op: write the new token into its
slot, attend (with the momentum update and the correction), evict if over budget.

One call per layer and step instead of a cache write of several small tensor ops plus two op calls: on
CPU each call costs ~25 us of framework overhead beside a ~100 us kernel (results/profile-step-cpu.json),
so the step as a whole is what is compiled (``ops/cpu.py``). The pieces stay the specification:
:func:`write_token` here, ``decode_attention`` and ``evict``; :func:`compose_step` joins any device's
kernels of the two ops into the step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .decode_attention import decode_attention_reference
from .evict import evict_reference


def write_token(keys: Tensor, values: Tensor, valid: Tensor, importance: Tensor, normalizer: Tensor,
                positions: Tensor, free_slot: Tensor, decode_len: Tensor, seen: Tensor, key: Tensor, value: Tensor,
                budget: int) -> None:
    """Write the new token's key and value [B, H, 1, D] into its slot, in place: ``P + decode_len`` while the
    decode region (``budget + 1`` slots after the ``P`` prompt slots) has room, then ``free_slot``, the slot the
    last eviction freed. The slot starts valid with a zero score; ``seen`` and ``decode_len`` count the token.

    Indexed assignment (``index_put_``) rather than ``scatter_``: compiled, a scatter into a buffer that is read
    afterwards is functionalised into a copy of the whole buffer each step, an index_put is done in place."""
    prompt_slots = keys.shape[2] - budget - 1
    target = torch.where(decode_len <= budget, prompt_slots + decode_len, free_slot)  # [B, H]
    batch = torch.arange(keys.shape[0], device=keys.device)[:, None]
    head = torch.arange(keys.shape[1], device=keys.device)[None, :]
    keys[batch, head, target] = key[:, :, 0]
    values[batch, head, target] = value[:, :, 0]
    valid[batch, head, target] = True
    importance[batch, head, target] = 0.0
    normalizer[batch, head, target] = 0.0
    positions[batch, head, target] = seen
    seen.add_(1)
    decode_len.add_(1)


def compose_step(attention: Callable, evict: Callable) -> Callable:
    """The decode step made of a device's ``decode_attention`` and ``evict`` kernels (same contracts as the
    references): write, attend, evict."""

    def step(query: Tensor, key: Tensor, value: Tensor, keys: Tensor, values: Tensor, valid: Tensor,
             evictable: Tensor, importance: Tensor, normalizer: Tensor, positions: Tensor, n: Tensor, mu_k: Tensor,
             mu_v: Tensor, comoment: Tensor, value_range: Tensor, free_slot: Tensor, decode_len: Tensor,
             seen: Tensor, scale: float, alpha: float, corrected: bool, moment_weight: float, sinks: Tensor | None,
             budget: int, policy: int, bias_correction: bool, recent_window: int, cap_window: bool, shared: bool,
             seed: int, fold: bool) -> Tensor:
        """query [B, Hq, Dk]; key [B, H, 1, Dk], value [B, H, 1, Dv]: the new token; the layer's buffers as in
        ``ops.layer.LayerState``; the rest as in ``decode_attention`` and ``evict``. Returns [B, Hq, Dv]."""
        write_token(keys, values, valid, importance, normalizer, positions, free_slot, decode_len, seen, key, value,
                    budget)
        out = attention(query, keys, values, valid, n, mu_k, mu_v, comoment, importance, normalizer, scale, alpha,
                        corrected, moment_weight, sinks, value_range)
        evict(keys, values, valid, evictable, importance, normalizer, positions, n, mu_k, mu_v, comoment, free_slot,
              decode_len, seen, budget, policy, bias_correction, recent_window, cap_window, shared, seed, fold,
              value_range)
        return out

    return step


decode_step_reference = compose_step(decode_attention_reference, evict_reference)

decode_step = torch.library.custom_op(
    "momentkv::decode_step", decode_step_reference,
    mutates_args=("keys", "values", "valid", "importance", "normalizer", "positions", "n", "mu_k", "mu_v",
                  "comoment", "value_range", "free_slot", "decode_len", "seen"),
)


@decode_step.register_fake
def _(query, key, value, *args):
    return query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
