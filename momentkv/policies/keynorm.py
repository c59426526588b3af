"""Key norm (kvpress's ``KnormPress``; Devoto et al., 2024): keys of low L2 norm draw high attention, so the keys
of highest norm go first. It reads keys only, so it needs no attention weights at all."""

from torch import Tensor

from momentkv.policies import register_policy


def keynorm(score: Tensor, attention: Tensor, position: Tensor, key: Tensor, step: Tensor) -> Tensor:
    return -key.float().norm(dim=-1)


register_policy("keynorm", keynorm)
