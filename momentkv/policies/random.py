"""Uniformly random eviction, the floor any rule must beat: a hash of each slot's age, the decode step, the KV
head and ``seed`` (no RNG state in a captured graph; a row evicts the same slots alone as in any batch)."""

from torch import Tensor

from momentkv.ops.scores import HASH, hash_uniform
from momentkv.policies import register_policy


def random(score: Tensor, attention: Tensor, position: Tensor, key: Tensor, step: Tensor, *, seed: int,
           seen: Tensor) -> Tensor:
    return hash_uniform(seen - position, step, seed)


register_policy("random", random, kernel=lambda config: HASH)
