"""``momentkv::decode_step``: a budgeted layer's decode step in one op: write the new token into its slot
(``momentkv::write``), attend, evict. The cache layer holds the token from ``update`` until its attention call.

One call instead of three: on CPU each call costs tens of microseconds of framework overhead beside a ~100 us
kernel (results/profile-step-cpu.json), so the step as a whole is what is compiled (``ops/cpu.py``). The pieces
stay the specification: :func:`compose_step` joins any device's kernels of ``decode_attention`` and ``evict``
into the step; ``write`` alone serves a step split around a registered rule or a collective.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import attention, eviction
from .attention import decode_attention_reference
from .eviction import evict_reference
from .signature import define


def write_reference(*, key: Tensor, value: Tensor, keys: Tensor, values: Tensor, valid: Tensor, importance: Tensor,
                    normalizer: Tensor, positions: Tensor, free_slot: Tensor, decode_len: Tensor, seen: Tensor,
                    budget: int, **_: Any) -> None:
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


def compose_step(attend: Callable, evict: Callable) -> Callable:
    """The decode step made of a device's ``decode_attention`` and ``evict`` kernels (both taking the decode
    parameters by name): write the token (:func:`write_reference`), attend, evict. Returns [B, Hq, Dv]."""

    def decode_step(**named: Any) -> Tensor:
        write_reference(**named)
        out = attend(**named)
        evict(**named)
        return out

    return decode_step


WRITE_MUTATES = ("keys", "values", "valid", "importance", "normalizer", "positions", "decode_len", "seen")
write = define("write", write_reference, attends=False, mutates=WRITE_MUTATES)

decode_step_reference = compose_step(decode_attention_reference, evict_reference)

decode_step = define("decode_step", decode_step_reference, attends=True,
                     mutates=tuple(dict.fromkeys(WRITE_MUTATES + attention.MUTATES + eviction.MUTATES)))
