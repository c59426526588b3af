"""Eviction rules, by name: ``momentkv.register_policy(name, fn)`` adds one, ``policy=name`` uses it.

A rule is a function ``fn(score, attention, position, key, step)`` of per-slot tensors that returns each slot's
new score, higher kept:

- ``score`` [batch, kv_heads, slots] fp32: the slot's score after the previous step (0 for a new token);
- ``attention`` [batch, kv_heads, slots] fp32: the probability this step's query gave the slot (averaged over
  the heads that share the KV head);
- ``position`` [batch, kv_heads, slots] int64: the token's position (padding counted, as transformers counts);
- ``key`` [batch, kv_heads, slots, head_dim]: the slot's key after RoPE, zero where the slot holds no token;
- ``step`` int64 scalar tensor: decode steps so far (0 while the prompt is scored).

It may also ask, by keyword-only parameters of these names, for any :class:`MomentKVConfig` field (bound once per
layer), ``layer`` (the budgeted layer's index), ``seen`` (tokens seen, an int64 scalar tensor) and ``normalizer``
(the slot's same recurrence on ones, ``Z = alpha Z + 1``). The engine calls it at every decode step after the
attention and, while the prompt is scored, once per observation query (``observation_window``); what it returns
for slots holding no token is ignored. It must be plain tensor code: no host syncs and no data-dependent shapes,
so that it compiles into the decode step (CUDA graphs included).

Every module of this package is a rule and registers itself on import; the built-in rules with a fused kernel
(momentum, window, random) name the score that kernel reads instead of calling the function.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

ARGUMENTS = ("score", "attention", "position", "key", "step")
ENGINE_EXTRAS = ("layer", "seen", "normalizer")


class PolicyError(ValueError):
    """A registered rule raised, or returned something other than a score per slot."""


@dataclass(frozen=True)
class Policy:
    """A registered rule: ``fn`` and the keyword-only extras it asks for; ``kernel``, for a built-in rule, maps
    the configuration to the ``ops.scores`` kind its fused kernels read (None: the engine calls ``fn``)."""

    name: str
    fn: Callable
    extras: tuple[str, ...]
    kernel: Callable[[Any], int] | None = None

    def bind(self, config: Any, layer: int) -> Callable:
        """``fn`` with the configuration fields and the layer index it asks for bound; the engine passes the rest
        (``seen``, ``normalizer``) by keyword to the returned function, which checks what the rule returns."""
        fixed = {name: (layer if name == "layer" else getattr(config, name))
                 for name in self.extras if name not in ("seen", "normalizer")}
        per_step = tuple(name for name in self.extras if name in ("seen", "normalizer"))
        name, fn = self.name, self.fn

        def rule(score, attention, position, key, step, *, seen, normalizer):
            given = {"seen": seen, "normalizer": normalizer}
            extra = {each: given[each] for each in per_step}
            if torch.compiler.is_compiling():
                return fn(score, attention, position, key, step, **fixed, **extra)
            try:
                out = fn(score, attention, position, key, step, **fixed, **extra)
            except Exception as error:
                raise PolicyError(f"policy {name!r} raised {type(error).__name__}: {error}") from error
            if not isinstance(out, torch.Tensor) or (out.shape, out.dtype, out.device) != (
                    score.shape, score.dtype, score.device):
                got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
                       else type(out).__name__)
                raise PolicyError(f"policy {name!r} must return a score per slot, shaped {tuple(score.shape)}, "
                                  f"{score.dtype} on {score.device}; it returned {got}")
            return out

        return rule


_REGISTRY: dict[str, Policy] = {}


def _config_fields() -> tuple[str, ...]:
    from momentkv.config import MomentKVConfig

    return tuple(f.name for f in fields(MomentKVConfig))


def register_policy(name: str, fn: Callable, *, kernel: Callable[[Any], int] | None = None) -> Callable:
    """Register ``fn`` as the eviction rule ``name`` (see the module's docstring); returns ``fn``.

    ``kernel`` is for built-in rules only: the ``ops.scores`` kind their fused kernels read, given the config."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise TypeError(f"name must be a non-empty str without surrounding spaces, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a policy named {name!r} is already registered; registered: {', '.join(_REGISTRY)}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as error:
        raise TypeError(f"fn of policy {name!r} has no inspectable signature ({error})") from error
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extras = tuple(p.name for p in parameters if p.kind == p.KEYWORD_ONLY)
    if len(positional) != len(ARGUMENTS) or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        raise TypeError(f"fn of policy {name!r} must take exactly the positional parameters ({', '.join(ARGUMENTS)}) "
                        f"and keyword-only extras; it takes ({', '.join(p.name for p in parameters)})")
    allowed = (*_config_fields(), *ENGINE_EXTRAS)
    unknown = [extra for extra in extras if extra not in allowed]
    if unknown:
        raise TypeError(f"fn of policy {name!r} asks for {', '.join(unknown)}; keyword-only parameters must name a "
                        f"MomentKVConfig field or one of {', '.join(ENGINE_EXTRAS)}")
    _REGISTRY[name] = Policy(name, fn, extras, kernel)
    return fn


def unregister_policy(name: str) -> None:
    """Remove a rule registered by :func:`register_policy` (a model patched with it keeps its bound function)."""
    if name not in _REGISTRY:
        raise ValueError(f"no policy named {name!r} is registered; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def policy(name: str) -> Policy:
    """The registered rule ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"policy must be a str naming a registered rule, got {type(name).__name__} ({name!r})")
    if name not in _REGISTRY:
        raise ValueError(f"policy must be one of {', '.join(map(repr, _REGISTRY))}; got {name!r} (register a rule "
                         "with momentkv.register_policy)")
    return _REGISTRY[name]


def policy_names() -> tuple[str, ...]:
    """Every registered rule's name, the built-in ones first (in the order their modules are named)."""
    return tuple(_REGISTRY)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
