"""Run an engine command (usually torchrun) as a child process tree that never outlives its task.

It has its own wall-clock limit because a Prefect task timeout cannot interrupt a blocking read when the task
runs in a worker thread:

- the child starts in a new session, so it is one process group that we signal with ``killpg`` (the process
  worker's own group kill does not reach it). torchrun in turn starts *each rank in a session of its own*,
  so a group kill of torchrun does not reach the ranks: the runner keeps a snapshot of the child's whole
  process tree (refreshed every few seconds) and, after SIGTERM and the grace period, SIGKILLs every
  process and process group in it that is still alive -- checked by start time, so a reused pid is spared.
  Each rank also dies with torchrun itself (``exit_with_launcher`` in mirotrain/training/distributed.py),
  so a torchrun killed on its own, by anyone, leaves no rank training unsupervised;
- ``PR_SET_PDEATHSIG`` makes the child get SIGTERM if the thread that started it dies (flow process
  SIGKILLed, OOM), so a crashed flow does not leave ranks holding GPUs. libc's ``prctl`` is resolved once at
  import, so the function that runs between fork and exec only calls it: loading a library there (taking the
  dynamic loader's lock, which another thread of the parent may have held at fork time) can deadlock;
- after the final SIGKILL the runner waits (up to ``REAP_TIMEOUT_S``) until every process of the snapshot is
  gone, so whatever the ranks held (the run lock of mirotrain/training/run_lock.py, GPU memory, ports) is free
  when the task's retry starts;
- stdout+stderr are merged and forwarded line by line to the Prefect run logger (non-Python children only
  reach the UI this way), and to an ``on_line`` callback (progress parsing);
- any ``BaseException`` while waiting (Prefect's TerminationSignal on cancel, TimeoutError, Ctrl-C) sends
  SIGTERM to the group, waits ``grace_s``, then SIGKILL, and re-raises;
- inside :func:`stop_when`, the runner asks a check every few seconds whether the command is still wanted;
  when the check gives a reason, the group is killed as on a timeout and :class:`CommandAbandoned` is raised
  (a multi-node agent stops a launch that node 0 has given up, tasks/node_agent.py);
- a non-zero exit code raises :class:`CommandFailed`, which Prefect turns into a task failure and a retry.
"""

from __future__ import annotations

import ctypes
import contextlib
import contextvars
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

PR_SET_PDEATHSIG = 1
REAP_TIMEOUT_S = 30.0  # how long a kill waits for the killed processes to be gone
_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None


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


class CommandAbandoned(RuntimeError):
    """A :func:`stop_when` check said the command is no longer wanted, and it was killed."""


StopCheck = Callable[[], "str | None"]  # None: keep running; a reason: stop the command
_stop_check: contextvars.ContextVar[tuple[StopCheck, float] | None] = contextvars.ContextVar("stop_check",
                                                                                            default=None)


@contextlib.contextmanager
def stop_when(check: StopCheck, every_s: float = 3.0) -> Iterator[None]:
    """Within the block, every :func:`run_streaming` calls ``check()`` every ``every_s`` seconds and kills its
    command (:class:`CommandAbandoned`) as soon as the check returns a reason. A context rather than a
    parameter, so the commands started through other launch code (tasks.train.run_engine) are covered too."""
    token = _stop_check.set((check, every_s))
    try:
        yield
    finally:
        _stop_check.reset(token)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec: no imports, no library loading
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _proc_stat(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, pgid, start time, state) of a process from ``/proc``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[2]), int(rest[19]), rest[0]


def process_tree(root: int) -> dict[int, tuple[int, int]]:
    """``pid -> (pgid, start time)`` for ``root`` and all its descendants (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st:
                children.setdefault(st[0], []).append(int(entry.name))
                stats[int(entry.name)] = (st[1], st[2])
    tree: dict[int, tuple[int, int]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree[pid] = stats[pid]
            todo += children.get(pid, [])
    return tree


def _same_process(pid: int, start: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[3] != "Z"


def _alive(tree: dict[int, tuple[int, int]]) -> list[int]:
    return [pid for pid, (_, start) in tree.items() if _same_process(pid, start)]


def wait_gone(tree: dict[int, tuple[int, int]], timeout_s: float = REAP_TIMEOUT_S) -> list[int]:
    """Wait until no process of ``tree`` is alive (zombies count as gone); the pids still alive at the end."""
    deadline = time.monotonic() + timeout_s
    while (alive := _alive(tree)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def kill_tree(tree: dict[int, tuple[int, int]], sig: int = signal.SIGKILL,
              wait_s: float = REAP_TIMEOUT_S) -> None:
    """Signal every still-living process of a :func:`process_tree` snapshot, and the groups they lead, then
    wait up to ``wait_s`` until they are all gone (a SIGKILLed rank may take a moment to release its files)."""
    for pid in _alive(tree):
        pgid = tree[pid][0]
        try:
            if pgid == pid:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    left = wait_gone(tree, wait_s)
    if left:
        print(f"[subprocess] pid(s) {left} still alive {wait_s:g}s after signal {sig}", file=sys.stderr, flush=True)


def kill_process_group(pgid: int, grace_s: float = 10.0, tree: dict[int, tuple[int, int]] | None = None) -> None:
    """SIGTERM the group (torchrun forwards it to its ranks), wait up to ``grace_s``, then SIGKILL the group
    and every process of ``tree`` (the snapshot that also covers ranks in their own sessions), and wait until
    they are gone (:data:`REAP_TIMEOUT_S`)."""
    tree = {**(tree or {}), **process_tree(pgid)}
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not wait_gone(tree, grace_s):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_tree(tree)


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
    tree: dict[int, tuple[int, int]] = {}
    next_snapshot = 0.0
    stop = _stop_check.get()
    next_stop_check = time.monotonic() + stop[1] if stop else float("inf")
    try:
        while True:
            if time.monotonic() > next_snapshot:  # keep knowing the ranks even if torchrun dies first
                tree.update(process_tree(proc.pid))
                next_snapshot = time.monotonic() + 3.0
            if deadline and time.monotonic() > deadline:
                raise CommandTimedOut(f"command ran longer than {timeout_s:.0f}s and was killed: {' '.join(cmd[:6])}")
            if stop and time.monotonic() > next_stop_check:
                if reason := stop[0]():
                    raise CommandAbandoned(f"{reason}; killed {' '.join(cmd[:6])}")
                next_stop_check = time.monotonic() + stop[1]
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
        kill_process_group(proc.pid, grace_s, tree)
        proc.wait()
        raise
    finally:
        # Whatever the exit path, nothing the child started may outlive the task (a rank whose launcher
        # was killed, a stray data-loader worker).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        kill_tree(tree)
    if rc != 0:
        raise CommandFailed(rc, cmd, tail)
    return rc
