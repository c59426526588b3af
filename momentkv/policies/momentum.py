"""Momentum (momentkv's own rule): a slot's score is the exponentially decayed sum of the attention it receives,
``I = alpha I + p``; with ``bias_correction`` it is divided by the same sum of ones, ``Z = alpha Z + 1`` (Adam's
correction), so that new tokens are not penalised for having been seen fewer times. ``alpha=1`` without the
correction is H2O's cumulative attention, ``alpha=0`` TOVA's last attention. Fused: the attention kernel keeps
``I`` and ``Z``, eviction reads ``I`` or ``I / Z``."""

from torch import Tensor

from momentkv.ops.scores import NORMALIZED, STORED
from momentkv.policies import register_policy


def momentum(score: Tensor, attention: Tensor, position: Tensor, key: Tensor, step: Tensor, *, alpha: float,
             bias_correction: bool, normalizer: Tensor) -> Tensor:
    if bias_correction:  # the stored score is I / Z; with Z = alpha Z' + 1, I / Z = ((Z - 1) I'/Z' + p) / Z
        return ((normalizer - 1.0) * score + attention) / normalizer.clamp_min(1e-20)
    return alpha * score + attention


register_policy("momentum", momentum, kernel=lambda config: NORMALIZED if config.bias_correction else STORED)
