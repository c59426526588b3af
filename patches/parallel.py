"""Tensor parallelism (transformers' ``tp_plan``): each rank holds some of every layer's KV heads, and so
its share of the budgeted cache. Per-head rules need nothing from the other ranks; a choice that combines
heads (the prefill vote, a layer-scope victim) reduces over the tensor-parallel group, so that every rank
keeps the tokens one process would keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor
from transformers import PreTrainedModel

from .private_api import device_mesh


@dataclass(frozen=True)
class HeadGroup:
    """The ranks a model's attention heads are split over (one rank: a model on one process)."""

    group: object | None = None  # a torch.distributed ProcessGroup
    size: int = 1

    def combine(self, tensor: Tensor, how: str = "sum") -> Tensor:
        """``tensor`` reduced over the ranks, ``how`` one of "sum", "min", "max" (a new tensor; the input is
        left as it is)."""
        if self.size == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=_OPS[how], group=self.group)
        return total

    def sum(self, tensor: Tensor) -> Tensor:
        return self.combine(tensor, "sum")


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


ONE_PROCESS = HeadGroup()


def head_group(model: PreTrainedModel) -> HeadGroup:
    """The tensor-parallel group of ``model`` (:data:`ONE_PROCESS` if it is not sharded by heads): the "tp"
    dimension of the device mesh of its sharded weights (DTensors, transformers 5.24), else of the mesh
    transformers kept on the model (5.17)."""
    from torch.distributed.tensor import DTensor

    if (getattr(model, "tp_size", None) or 1) == 1:
        return ONE_PROCESS
    meshes = [p.device_mesh for p in model.parameters() if isinstance(p, DTensor)] + [device_mesh(model)]
    for mesh in meshes:
        if mesh is None:
            continue
        names = mesh.mesh_dim_names or ()
        if "tp" in names:
            mesh = mesh["tp"] if mesh.ndim > 1 else mesh
        elif mesh.ndim > 1:
            continue
        if mesh.size() > 1:
            return HeadGroup(mesh.get_group(), mesh.size())
    raise ValueError(f"momentkv cannot find the tensor-parallel group of this model (tp_size={model.tp_size}, but no "
                     "device mesh with a 'tp' dimension on its weights or the model)")
