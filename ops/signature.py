"""The one parameter list of the decode ops (``write``, ``decode_attention``, ``evict``, ``decode_step``),
derived from the fields of :class:`LayerState` and :class:`StepSettings`.

Every op takes the same parameters in the same order: the new token, the layer's buffers, its settings,
and what varies per call. Op bodies take them by name (``**named``); the positional order, which a
``torch.library`` schema needs, is made here and nowhere else, so adding a setting is one field and its use.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Callable, Optional, get_type_hints

import torch
from torch import Tensor

from .state import LayerState, StepSettings

# Per call: the new token (query [B, Hq, Dk], key [B, H, 1, Dk], value [B, H, 1, Dv]; what an op does not read
# may be None), the attention scale and logit soft cap (0: none), the model's learned sink logits [Hq] and an
# eviction rank computed outside the op ([B, H, S] float64, tensor parallelism), each with its default.
PER_CALL: dict[str, tuple[Any, Any]] = {
    "query": (Optional[Tensor], None),
    "key": (Optional[Tensor], None),
    "value": (Optional[Tensor], None),
    "scale": (float, 1.0),
    "softcap": (float, 0.0),
    "sink_logits": (Optional[Tensor], None),
    "rank": (Optional[Tensor], None),
}
# Field names as plain tuples: the compiled decode step reads them (dynamo does not trace ``fields`` of a class).
STATE_FIELDS = tuple(f.name for f in fields(LayerState))
SETTING_FIELDS = tuple(f.name for f in fields(StepSettings))
_TYPES = {**get_type_hints(LayerState), **get_type_hints(StepSettings),
          **{name: kind for name, (kind, _) in PER_CALL.items()}}

PARAMETERS = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_TYPES[name])
              for name in (*STATE_FIELDS, *SETTING_FIELDS, *PER_CALL)]
NAMES = tuple(p.name for p in PARAMETERS)
_KNOWN = frozenset(NAMES)


def named(state: LayerState, settings: StepSettings, **per_call: Any) -> dict[str, Any]:
    """Every parameter by name: the state's tensors, the settings, and ``per_call`` (which may also replace a
    state tensor or a setting, e.g. a scratch ``importance``)."""
    unknown = [name for name in per_call if name not in _KNOWN]  # not ``keys() - set``: torch 2.11's dynamo fails on it
    if unknown:
        raise TypeError(f"not a decode-op parameter: {', '.join(sorted(unknown))}")
    values = {name: default for name, (_, default) in PER_CALL.items()}
    values.update({name: getattr(state, name) for name in STATE_FIELDS})
    values.update({name: getattr(settings, name) for name in SETTING_FIELDS})
    values.update(per_call)
    return values


def positional(values: dict[str, Any]) -> tuple:
    """``values`` (as :func:`named` gives them) in the schema's order."""
    return tuple(values[name] for name in NAMES)


def by_name(body: Callable, returns: Any = None) -> Callable:
    """``body`` (which takes the parameters by name) called with them in the schema's order, as torch.library
    calls kernels; carries the schema's signature (returning ``returns``), from which ``custom_op`` infers it."""

    def kernel(*args):
        return body(**dict(zip(NAMES, args)))

    kernel.__signature__ = inspect.Signature(PARAMETERS, return_annotation=returns)
    kernel.__name__ = kernel.__qualname__ = getattr(body, "__name__", "kernel")
    return kernel


def define(name: str, reference: Callable, mutates: tuple[str, ...], attends: bool) -> Any:
    """The custom op ``momentkv::{name}`` over the decode parameters, with its plain-PyTorch ``reference`` (taking
    them by name) as the kernel of every device. An op that ``attends`` returns [B, Hq, Dv] in the query's dtype;
    the others return nothing."""
    op = torch.library.custom_op(f"momentkv::{name}", by_name(reference, Tensor if attends else None),
                                 mutates_args=mutates)
    op.register_fake(by_name(_attention_output if attends else _nothing))
    return op


def _attention_output(*, query: Tensor, values: Tensor, **_: Any) -> Tensor:
    return query.new_empty(query.shape[0], query.shape[1], values.shape[-1])


def _nothing(**_: Any) -> None:
    return None
