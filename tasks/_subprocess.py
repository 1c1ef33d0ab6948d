"""Run an engine command (usually torchrun) as a child process tree that never outlives its task.

Pattern from ../shared/reference/prefect-notes.md section A.8, with a wall-clock limit added because a Prefect
task timeout cannot interrupt a blocking read when the task runs in a worker thread (issue #15760):

- the child starts in a new session, so its whole tree (torchrun + every rank) is one process group that we
  signal with ``killpg`` -- the process worker's own group kill does not reach it;
- ``PR_SET_PDEATHSIG`` makes the child get SIGTERM if the thread that started it dies (flow process
  SIGKILLed, OOM), so a crashed flow does not leave ranks holding GPUs;
- stdout+stderr are merged and forwarded line by line to the Prefect run logger (non-Python children only
  reach the UI this way), and to an ``on_line`` callback (progress parsing);
- any ``BaseException`` while waiting (Prefect's TerminationSignal on cancel, TimeoutError, Ctrl-C) sends
  SIGTERM to the group, waits ``grace_s``, then SIGKILL, and re-raises;
- a non-zero exit code raises :class:`CommandFailed`, which Prefect turns into a task failure and a retry.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

PR_SET_PDEATHSIG = 1


class CommandFailed(RuntimeError):
    """The child exited non-zero (or was killed by a signal: negative code)."""

    def __init__(self, returncode: int, cmd: Sequence[str], tail: list[str]):
        self.returncode = returncode
        self.cmd = list(cmd)
        self.tail = tail
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        last = "\n".join(tail[-20:])
        super().__init__(f"command failed with {how}: {' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}\n{last}")


class CommandTimedOut(TimeoutError):
    """The child ran past its wall-clock limit and was killed."""


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def kill_process_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the group, give it ``grace_s`` to exit (torchrun forwards to its ranks), then SIGKILL."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_streaming(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
                  log: Callable[[str], None] = print, on_line: Callable[[str], None] | None = None,
                  on_start: Callable[[int], None] | None = None,
                  timeout_s: float | None = None, grace_s: float = 10.0, tail_lines: int = 200) -> int:
    """Run ``cmd``, stream its output, and return 0 or raise (:class:`CommandFailed`, :class:`CommandTimedOut`).

    ``env`` is merged over ``os.environ``. ``on_start`` receives the child's pid (= its process-group id).
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            errors="replace", env=full_env, cwd=cwd, start_new_session=True,
                            preexec_fn=_set_pdeathsig)
    if on_start:
        on_start(proc.pid)
    # A reader thread feeds a queue so the calling (main) thread stays responsive to signals and can
    # enforce the deadline even while the child prints nothing.
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name=f"stream-{proc.pid}", daemon=True)
    reader.start()
    tail: list[str] = []
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while True:
            if deadline and time.monotonic() > deadline:
                raise CommandTimedOut(f"command ran longer than {timeout_s:.0f}s and was killed: {' '.join(cmd[:6])}")
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            log(line)
            tail.append(line)
            del tail[:-tail_lines]
            if on_line:
                on_line(line)
        rc = proc.wait()
    except BaseException:
        kill_process_group(proc.pid, grace_s)
        proc.wait()
        raise
    finally:
        # Ranks may outlive torchrun's own exit (e.g. the launcher was SIGKILLed by the fault hook);
        # nothing in the group may survive the task.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if rc != 0:
        raise CommandFailed(rc, cmd, tail)
    return rc
