"""Where this process sits in a run: its device, its ranks and the meshes that every part is built for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mirotrain.parallel.mesh import ParallelMeshes


@dataclass(frozen=True)
class Layout:
    """This rank's device and place in the data-parallel x sequence-parallel meshes."""

    device: torch.device
    rank: int
    world_size: int
    meshes: ParallelMeshes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.meshes.dp_rank

    @property
    def dp_size(self) -> int:
        return self.meshes.dp_size

    @property
    def sp_rank(self) -> int:
        return self.meshes.sp_rank

    @property
    def sp_size(self) -> int:
        return self.meshes.sp_size

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The Ulysses group whose ranks hold disjoint tokens of the same rows (None without SP)."""
        return self.meshes.sp_group if self.sp_size > 1 else None

    @property
    def loss_group(self) -> dist.ProcessGroup:
        """Every rank that shares dense gradients (dp x sp): token and pair counts are reduced over it."""
        return self.meshes.fsdp_group

    @property
    def grad_divide_factor(self) -> float:
        """FSDP averages reduced gradients over every rank of its mesh (dp x sp)."""
        return float(self.meshes.fsdp.size())
