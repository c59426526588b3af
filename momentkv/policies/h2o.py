"""H2O's heavy hitters (Zhang et al., 2023): the cumulative attention a token has received."""

from torch import Tensor

from momentkv.policies import register_policy


def h2o(score: Tensor, attention: Tensor, position: Tensor, key: Tensor, step: Tensor) -> Tensor:
    return score + attention


register_policy("h2o", h2o)
