"""TOVA (Oren et al., 2024): the attention the newest query gives a token, nothing older."""

from torch import Tensor

from momentkv.policies import register_policy


def tova(score: Tensor, attention: Tensor, position: Tensor, key: Tensor, step: Tensor) -> Tensor:
    return attention


register_policy("tova", tova)
