"""Process group, device and mesh for a run: under torchrun, or as one process (a 1-rank group).

Always running inside a process group (even for one process) keeps one code path: FSDP, DCP and the metric
all-reduces behave the same for 1 and N ranks. CPU runs use gloo; CUDA runs use ``cpu:gloo,cuda:nccl`` so
that CPU-side collectives (async checkpoint coordination, object broadcasts) have a backend too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# The process that started this one, read when the engine first imports this module, before torch's
# seconds-long import and the model build: under torchrun, the launcher agent (see exit_with_launcher).
STARTED_BY = os.getppid()

import torch  # noqa: E402 - after STARTED_BY on purpose: the earlier it is read, the smaller the race
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402

PG_TIMEOUT = timedelta(minutes=30)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_launcher(expected_parent: int = STARTED_BY) -> None:
    """Under torchrun on Linux: SIGKILL this rank when its launcher dies, and exit now if it already has.

    torchrun starts each rank in a session of its own, so neither a process-group kill nor the launcher's
    own death signal reaches the ranks: without this, a SIGKILLed agent leaves its ranks training
    unsupervised to the end. ``PR_SET_PDEATHSIG`` only covers a parent alive when it is set, so the parent
    is then compared with ``expected_parent``: a launcher that died earlier has left this rank adopted by
    another process. Outside torchrun (no ``TORCHELASTIC_RUN_ID``) and off Linux it does nothing.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent:
        raise SystemExit(f"rank {os.environ.get('RANK', '?')}: its launcher (pid {expected_parent}) is gone "
                         f"(parent is now pid {os.getppid()}); exiting instead of training unsupervised")


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
    """Initialise (or reuse) the default process group and pick this rank's device.

    Every rank of an engine run passes here first, so this is where a torchrun rank ties its life to its
    launcher (:func:`exit_with_launcher`).
    """
    exit_with_launcher()
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
