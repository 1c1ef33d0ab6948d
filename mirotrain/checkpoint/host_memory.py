"""How much host memory step checkpoints take on a node, how much the node (or its cgroup) has left, and which
save mode fits.

Two things can hold host memory:

* **Async staging buffers.** Async saves keep a host copy of every rank's model and optimizer state for the
  whole run (fp32 weights + AdamW: 12 bytes per parameter): Qwen3-8B on 4 GPUs keeps ~92 GiB of the node,
  Qwen3-32B on 8 GPUs ~366 GiB.
* **A checkpoint directory on tmpfs or ramfs** (``/dev/shm``, a RAM disk). Every file written there is host
  memory that nothing can reclaim: the kept checkpoints (``keep_last_n_checkpoints``) plus the one being
  written, each the size of the node's ranks' state (~92 GiB for Qwen3-8B). Together with the staging buffers
  that took a 256 GB host down with an out-of-memory kill in the middle of a save.

Where all of it does not fit, the first save would take the node down, and auto-resume would crash at the
same save again. So before the first save (:func:`plan_host_memory`, also shown by ``mirotrain validate``):
async saves where the staging buffers and the memory-backed checkpoints fit; otherwise synchronous saves
(no staging buffers: DCP streams tensor by tensor) where the checkpoints alone fit; otherwise a refusal with
one line naming the directory and the numbers (a training that cannot keep its checkpoints must not start
writing them). Checkpoints already in the directory are part of the used memory the kernel reports (tmpfs
pages are never "available"), so only the bytes still to come are counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirotrain.checkpoint.layout import CheckpointInputError
from mirotrain.checkpoint.staging import tensor_layout

# Share of the available memory checkpoints may take (the rest: dataloader workers, page cache, Python).
HOST_MEMORY_FRACTION = 0.8
# File systems whose files live in host memory.
MEMORY_FS_TYPES = ("tmpfs", "ramfs")
GIB = 2**30


class HostMemoryError(CheckpointInputError):
    """Step checkpoints in a memory-backed directory would not fit in the node's memory (a user's choice of
    output_dir, keep_last_n_checkpoints or world size: reported as one line, like an unusable checkpoint)."""


def staged_bytes(state: dict[str, Any], keys: tuple[str, ...]) -> int:
    """Host bytes that copies of this rank's tensors (DTensors: local shards) under ``keys`` take."""
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in tensor_layout({key: state.get(key) for key in keys}))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_host_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process's node can still hand out: ``MemAvailable``, lowered to the cgroup's headroom
    (v2 ``memory.max - memory.current``, v1 ``limit - usage``) when a container limit is set; None if unknown."""
    candidates = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 reports "no limit" as ~2^63
            candidates.append(max(limit - usage, 0))
    return min(candidates) if candidates else None


def local_world_size() -> int:
    """Ranks on this node (torchrun sets LOCAL_WORLD_SIZE); each stages its own share."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _unescape_mount_path(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (``\\040``)."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def filesystem_type(path: str | os.PathLike, mounts: Path = Path("/proc/mounts")) -> str | None:
    """Type of the file system that holds ``path``, or that will hold it: the mount of its nearest existing
    parent (an output_dir is usually created by the run itself). None if the mount table cannot be read."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    real = os.path.realpath(existing)
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    found, found_len = None, -1
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount_path(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= found_len:  # the longest mount point wins; a later mount on it shadows earlier
            found, found_len = fields[2], len(point)
    return found


def directory_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@dataclass(frozen=True)
class HostMemoryPlan:
    """A node's host memory for step checkpoints and the save mode that fits it.

    Args:
        directory: where the checkpoints go.
        fs_type: its file system type (None: unknown).
        staging: bytes of the async staging buffers of the node's ranks.
        checkpoints: bytes still to come in host memory from checkpoint files (0 unless the directory is on
            tmpfs/ramfs): ``max(one, (keep + 1) * one - already there)``.
        available: the node's available memory (None: unknown, nothing is refused).
    """

    directory: str
    fs_type: str | None
    staging: int
    checkpoints: int
    available: int | None

    @property
    def in_memory(self) -> bool:
        return self.fs_type in MEMORY_FS_TYPES

    @property
    def limit(self) -> float | None:
        return None if self.available is None else HOST_MEMORY_FRACTION * self.available

    def mode(self, async_requested: bool) -> str:
        """``async``, ``sync`` (no staging buffers) or ``refuse`` (not even the checkpoint files fit)."""
        limit = self.limit
        if limit is None or (async_requested and self.staging + self.checkpoints <= limit):
            return "async" if async_requested else "sync"
        return "sync" if self.checkpoints <= limit else "refuse"

    def refusal(self) -> str:
        """One line: why the checkpoints cannot be written there, with the numbers and what to change."""
        return (f"step checkpoints in {self.directory} ({self.fs_type}: files held in host memory) would take "
                f"~{self.checkpoints / GIB:.0f} GiB of this node's memory (the kept checkpoints and the one being "
                f"written), above {HOST_MEMORY_FRACTION:.0%} of the {(self.available or 0) / GIB:.0f} GiB available; "
                "put output_dir on a disk, lower keep_last_n_checkpoints or use more nodes")

    def fallback(self) -> str:
        """One line: why saves go synchronous."""
        where = (f" plus ~{self.checkpoints / GIB:.1f} GiB of checkpoint files in {self.directory} ({self.fs_type})"
                 if self.in_memory else "")
        return (f"Async checkpointing would keep ~{self.staging / GIB:.1f} GiB of host memory on this node (its "
                f"ranks' model and optimizer state){where}; only {(self.available or 0) / GIB:.1f} GiB are "
                "available. Saving step checkpoints synchronously instead (each save blocks training until "
                "written; enable_async_checkpointing: false silences this).")


def plan_host_memory(directory: str | os.PathLike, *, staging: int, checkpoint: int, keep_last_n: int,
                     available: int | None, mounts: Path = Path("/proc/mounts")) -> HostMemoryPlan:
    """The host-memory plan of a node whose ranks' state takes ``checkpoint`` bytes per checkpoint and
    ``staging`` bytes of async staging buffers, writing into ``directory`` with ``keep_last_n`` kept."""
    fs_type = filesystem_type(directory, mounts)
    to_come = 0
    if fs_type in MEMORY_FS_TYPES:
        at_most = (keep_last_n + 1) * checkpoint  # the kept ones and the one being written
        to_come = max(checkpoint, at_most - directory_bytes(directory))
    return HostMemoryPlan(str(directory), fs_type, staging, to_come, available)
