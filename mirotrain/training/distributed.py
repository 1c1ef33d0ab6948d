"""Process group, device and mesh for a run: under torchrun, or as one process (a 1-rank group).

Always running inside a process group (even for one process) keeps one code path: FSDP, DCP and the metric
all-reduces behave the same for 1 and N ranks. CPU runs use gloo; CUDA runs use ``cpu:gloo,cuda:nccl`` so
that CPU-side collectives (async checkpoint coordination, object broadcasts) have a backend too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

PG_TIMEOUT = timedelta(minutes=30)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Initialise (or reuse) the default process group and pick this rank's device."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but CUDA is not available (set device=cpu for CPU runs)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            kwargs: dict[str, Any] = {"backend": backend, "timeout": PG_TIMEOUT}
            if device_type == "cuda":
                kwargs["device_id"] = device
            dist.init_process_group(**kwargs)
        else:  # one process without torchrun: a private in-memory store, no ports
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=PG_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def build_dp_mesh(info: DistInfo, replicate: int = 1) -> DeviceMesh:
    """The data-parallel mesh FSDP shards over: 1-D ``dp`` or 2-D (``dp_replicate``, ``dp_shard``) for HSDP."""
    if replicate < 1 or info.world_size % replicate:
        raise ValueError(f"data_parallel_replicate_dim ({replicate}) must divide the world size ({info.world_size})")
    if replicate == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
    return init_device_mesh(info.device.type, (replicate, info.world_size // replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """``obj`` from rank ``src`` on every rank (setup-time only: this is a blocking collective)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
