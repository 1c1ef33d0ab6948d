"""Test-only fault injection (docs/contracts.md): die like a lost node, right after optimizer step k.

``MIROTRAIN_FAULT_AFTER_STEP=k`` makes every rank SIGKILL its own process group right after step k (torchrun
starts each worker in its own session, so torchrun then sees all workers die and exits) — unless the file
named by ``MIROTRAIN_FAULT_MARKER`` existed when the run started. The marker is created before dying, so the
restarted run does not fault again. Whether a run is armed is decided once at start-up (rank 0 looks, all
ranks agree), so every rank of the faulting run dies at the same step. Resume tests use this to kill a run at
a chosen point, including while an asynchronous checkpoint is still being written: a save launched at step k is
in flight when the run dies, while one launched at an earlier step has landed first (the hook waits for it), so
the kill point is the same on a loaded machine as on an idle one.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch.distributed as dist

from mirotrain.checkpoint.step_checkpointer import StepCheckpointer
from mirotrain.training.distributed import broadcast_object

log = logging.getLogger("mirotrain.train")


def fault_step() -> int | None:
    value = os.environ.get("MIROTRAIN_FAULT_AFTER_STEP")
    return int(value) if value else None


def fault_armed() -> bool:
    """True when the hook is set and its marker does not exist yet (call once at start-up, on rank 0)."""
    if fault_step() is None:
        return False
    marker = os.environ.get("MIROTRAIN_FAULT_MARKER")
    return not (marker and Path(marker).exists())


def inject_fault() -> None:
    """Create the marker, then SIGKILL our process group (or only this process if it leads no group)."""
    marker = os.environ.get("MIROTRAIN_FAULT_MARKER")
    if marker:
        Path(marker).touch()
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class FaultHook:
    """The loop's one call: :meth:`after_step` kills the run at the armed step (every rank agrees on arming)."""

    def __init__(self, rank: int):
        self.step = fault_step() if broadcast_object(fault_armed() if rank == 0 else None) else None

    def after_step(self, step: int, earlier_saves: StepCheckpointer | None) -> None:
        """``earlier_saves``: the checkpointer when no save was launched at ``step`` (None otherwise); its pending
        save, from an earlier step, lands on every rank before any rank dies."""
        if step != self.step:
            return
        if earlier_saves is not None:
            earlier_saves.wait()
            dist.barrier()
        log.warning("MIROTRAIN_FAULT_AFTER_STEP=%d: killing this process group (test fault injection)", step)
        inject_fault()
