"""How much host memory an async save would pin, and how much the node (or its cgroup) has left.

Async saves keep a host copy of every rank's model and optimizer state for the whole run (fp32 weights +
AdamW: 12 bytes per parameter): Qwen3-8B on 4 GPUs keeps ~92 GiB of the node, Qwen3-32B on 8 GPUs ~366 GiB.
Where that does not fit, the first save would take the node down with an out-of-memory kill, and
auto-resume would crash at the same save again. The step checkpointer asks here first and saves
synchronously instead (DCP then streams tensor by tensor).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mirotrain.checkpoint.staging import tensor_layout

# Share of the available memory the staged copies may take (the rest: dataloader workers, page cache, Python).
HOST_MEMORY_FRACTION = 0.8


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
