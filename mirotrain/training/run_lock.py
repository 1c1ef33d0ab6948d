"""One training per output_dir: an exclusive lock that global rank 0 holds for the life of the training.

Two trainings writing into one output_dir corrupt each other's checkpoints, metrics and exports. That happens
when, for example, the nodes of a multi-node job fail to rendezvous and each starts a 1-node training with
the same config. At start-up rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``{output_dir}/run.lock``
and writes the owner into it (host, pid, start time, world size); the other ranks learn the outcome by a
broadcast, so a refused training stops on every rank before any of them touches the directory.

A lock that is held is waited for, up to ``MIROTRAIN_RUN_LOCK_WAIT_S`` seconds (default 60; the wait is
logged once, naming the owner), before the training is refused with :class:`RunLockedError` naming the
directory and the owner. The wait covers a retry that starts while the previous attempt's ranks are still
exiting (a SIGKILLed process keeps its files open until the kernel has torn it down): refusing at once would
turn that transient overlap into a permanent failure (exit code 2 is not retried, tasks/_retry.py). A second
training that really runs concurrently is still refused, only after the wait.

The kernel releases a flock when the last file descriptor of the lock's open file description closes, so a
process that dies in any way, SIGKILL included, leaves the lock free and a retry can resume; the file's
stale owner text is simply overwritten by the next holder. Forked children (data-loader workers) close their
inherited descriptor at once, so only the training process itself keeps the lock alive. On a shared
filesystem the lock needs flock support (NFSv4 maps it to byte-range locks; Lustre needs the ``flock``
mount option); without it ``flock`` fails with an error rather than pretending to lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from mirotrain.training.distributed import broadcast_object

LOCK_FILE = "run.lock"
WAIT_VARIABLE = "MIROTRAIN_RUN_LOCK_WAIT_S"
DEFAULT_WAIT_S = 60.0
_POLL_S = 0.5
log = logging.getLogger(__name__)
_held_fds: set[int] = set()


class RunLockedError(RuntimeError):
    """Another training holds the output_dir's run lock (a permanent error: retrying cannot help while it runs)."""


def _close_in_child() -> None:
    for fd in list(_held_fds):
        os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The held lock of one output_dir (see the module docstring); :meth:`release` frees it early."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, output_dir: Path, rank: int, world_size: int) -> "RunLock":
        """Collective: rank 0 takes the lock; every rank raises :class:`RunLockedError` if it is held."""
        path = Path(output_dir) / LOCK_FILE
        fd, refusal = None, None
        if rank == 0:
            fd, refusal = _lock_within(path, world_size, lock_wait_s())
        if dist.is_initialized() and dist.get_world_size() > 1:
            refusal = broadcast_object(refusal)
        if refusal is not None:
            raise RunLockedError(refusal)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            _held_fds.discard(self._fd)
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:
        # a trainer that failed during set-up is dropped without close(): its lock must not outlive it
        self.release()


def lock_wait_s() -> float:
    """Seconds to wait for a held lock: ``MIROTRAIN_RUN_LOCK_WAIT_S``, default :data:`DEFAULT_WAIT_S`."""
    value = os.environ.get(WAIT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_WAIT_S
    try:
        wait = float(value)
    except ValueError:
        wait = -1.0
    if not wait >= 0:
        raise ValueError(f"{WAIT_VARIABLE}={value!r}: expected a number of seconds >= 0")
    return wait


def _lock_within(path: Path, world_size: int, wait_s: float) -> tuple[int | None, str | None]:
    """Try the lock until it is free or ``wait_s`` has passed; the result of the last :func:`_try_lock`."""
    deadline = time.monotonic() + wait_s
    fd, owner = _try_lock(path, world_size)
    if fd is None and wait_s > 0:
        log.warning(f"output_dir {path.parent} is locked by another training (owner: {_describe(owner)}); "
                    f"waiting up to {wait_s:g}s ({WAIT_VARIABLE}) for it to end")
    while fd is None and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        fd, owner = _try_lock(path, world_size)
    if fd is not None:
        return fd, None
    return None, (f"output_dir {path.parent} is in use by another training (owner: {_describe(owner)}); "
                  f"refusing to write into it (lock file {path})")


def _try_lock(path: Path, world_size: int) -> tuple[int | None, str]:
    """(descriptor, "") when locked, or (None, the owner's text) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown (the owner has not written it yet)"
        os.close(fd)
        return None, owner
    except BaseException:
        os.close(fd)
        raise
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "world_size": world_size}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    _held_fds.add(fd)
    return fd, ""


def _describe(owner_text: str) -> str:
    try:
        owner = json.loads(owner_text)
        return (f"host {owner['host']}, pid {owner['pid']}, started {owner['started']}, "
                f"world size {owner['world_size']}")
    except (json.JSONDecodeError, KeyError, TypeError):
        return owner_text
