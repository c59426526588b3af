"""Tensor parallelism (transformers' ``tp_plan``): each rank holds some of every layer's KV heads, and so
its share of the budgeted cache. Per-head rules need nothing from the other ranks; a choice that combines
heads (the prefill vote) sums over the tensor-parallel group, so that every rank keeps the tokens one
process would keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor
from transformers import PreTrainedModel


@dataclass(frozen=True)
class HeadGroup:
    """The ranks a model's attention heads are split over (one rank: a model on one process)."""

    group: object | None = None  # a torch.distributed ProcessGroup
    size: int = 1

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks (a new tensor; the input is left as it is)."""
        if self.size == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total


ONE_PROCESS = HeadGroup()


def head_group(model: PreTrainedModel) -> HeadGroup:
    """The tensor-parallel group of ``model``, found from the device mesh of its sharded weights (DTensors
    on a mesh with a "tp" dimension); :data:`ONE_PROCESS` when nothing is sharded that way."""
    from torch.distributed.tensor import DTensor

    for parameter in model.parameters():
        if isinstance(parameter, DTensor):
            mesh = parameter.device_mesh
            names = mesh.mesh_dim_names or ()
            if "tp" in names and mesh.size(names.index("tp")) > 1:
                return HeadGroup(mesh.get_group("tp"), mesh.size(names.index("tp")))
    if dist.is_available() and dist.is_initialized() and (getattr(model, "tp_size", None) or 1) > 1:
        raise ValueError("momentkv cannot find the tensor-parallel group of this model (it is sharded, but none of "
                         "its weights is a DTensor on a mesh with a 'tp' dimension)")
    return ONE_PROCESS
