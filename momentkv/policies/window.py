"""A recency window: the oldest token goes (StreamingLLM is this rule with the prompt competing and 4 sinks)."""

import torch
from torch import Tensor

from momentkv.ops.scores import POSITION
from momentkv.policies import register_policy


def window(score: Tensor, attention: Tensor, position: Tensor, key: Tensor, step: Tensor) -> Tensor:
    return position.to(torch.float32)


register_policy("window", window, kernel=lambda config: POSITION)
