"""KeyDiff (Park et al., 2025): keep the keys least similar to the head's mean key direction; the keys that
look like every other key go first. The anchor is the mean of the unit keys the head holds (a slot holding
no token has a zero key, which scales the mean and leaves every cosine as it is)."""

import torch.nn.functional as F
from torch import Tensor

from momentkv.policies import register_policy


def keydiff(score: Tensor, attention: Tensor, position: Tensor, key: Tensor, step: Tensor) -> Tensor:
    unit = F.normalize(key.float(), dim=-1)
    anchor = F.normalize(unit.mean(dim=-2, keepdim=True), dim=-1)
    return -(unit * anchor).sum(-1)


register_policy("keydiff", keydiff)
