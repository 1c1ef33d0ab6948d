"""One training per output_dir: an exclusive lock that global rank 0 holds for the life of the training.

Two trainings writing into one output_dir corrupt each other's checkpoints, metrics and exports. That happens
when, for example, the nodes of a multi-node job fail to rendezvous and each starts a 1-node training with
the same config. At start-up rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``{output_dir}/run.lock``
and writes the owner into it (host, pid, start time, world size); the other ranks learn the outcome by a
broadcast, so a refused training stops on every rank before any of them touches the directory. A second
training is refused with :class:`RunLockedError` naming the directory and the owner.

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
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from mirotrain.training.distributed import broadcast_object

LOCK_FILE = "run.lock"
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
            fd, refusal = _try_lock(path, world_size)
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


def _try_lock(path: Path, world_size: int) -> tuple[int | None, str | None]:
    """(descriptor, None) when locked, or (None, why not) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown (the owner has not written it yet)"
        os.close(fd)
        return None, (f"output_dir {path.parent} is in use by another training (owner: {_describe(owner)}); "
                      f"refusing to write into it (lock file {path})")
    except BaseException:
        os.close(fd)
        raise
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "world_size": world_size}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    _held_fds.add(fd)
    return fd, None


def _describe(owner_text: str) -> str:
    try:
        owner = json.loads(owner_text)
        return (f"host {owner['host']}, pid {owner['pid']}, started {owner['started']}, "
                f"world size {owner['world_size']}")
    except (json.JSONDecodeError, KeyError, TypeError):
        return owner_text
