"""Supervision of the engine's ranks: when the torchrun agent dies, its ranks die with it.

torchrun starts every rank in a session of its own, so only the rank-side guard in
mirotrain/training/distributed.py (``exit_with_launcher``) can take them down once the agent is gone.
These tests run real processes: a real 2-rank CPU (gloo) training of the tiny config, and a real parent
that dies before its child installs the guard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline_helpers import REPO, processes_mentioning, tiny_stage_overrides
from ports import free_port

pytestmark = pytest.mark.slow



def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                kids.append(int(entry.name))
    return kids


def _kill_if_alive(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(600)
def test_killing_torchrun_agent_kills_its_ranks(demo_inputs: dict, tmp_path: Path) -> None:
    """SIGKILL of the torchrun agent alone (not its group, not the ranks) leaves no rank running within 10 s."""
    out = tmp_path / "orphan-check"
    config, overrides = tiny_stage_overrides(demo_inputs, "sft", tmp_path, ["epochs=50", f"output_dir={out}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mirotrain", "sft", "--config", config, *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "torchrun.log"
    with open(log, "w") as sink:
        agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 420
        while "step 2" not in log.read_text().lower():  # both ranks are past start-up and training
            assert agent.poll() is None, f"torchrun exited early ({agent.returncode}):\n{log.read_text()[-8000:]}"
            assert time.monotonic() < deadline, f"training never reached step 2:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        ranks = _children(agent.pid)
        assert len(ranks) == 2, f"expected 2 ranks under torchrun {agent.pid}, found {ranks}"
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        killed = time.monotonic()
        while processes_mentioning(str(out)) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        left = processes_mentioning(str(out))
        print(f"ranks {ranks}: {len(left)} still running {time.monotonic() - killed:.2f} s after the agent was SIGKILLed")
        assert left == [], f"ranks still running 10 s after the agent was killed: {left}"
    finally:
        _kill_if_alive([agent.pid, *ranks])


def test_rank_whose_launcher_died_before_the_guard_exits(tmp_path: Path) -> None:
    """The race the death signal cannot cover: the launcher is gone before the rank sets it up."""
    child = textwrap.dedent("""
        import sys, time
        import mirotrain.training.distributed as d   # records the launcher (the parent) here
        print("imported", flush=True)
        sys.stdin.read()                              # the launcher exits, closing our stdin
        time.sleep(0.5)                               # the kernel reparents this process
        d.exit_with_launcher()
        print("guard let an orphan train", flush=True)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", {child!r}], stdin=subprocess.PIPE, stdout=sys.stdout,
                             stderr=sys.stdout, start_new_session=True)
        print(p.pid, flush=True)
        sys.stdin.readline()   # wait for the child to have imported the engine, then die without waiting
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHELASTIC_RUN_ID": "test", "RANK": "0"}
    out = tmp_path / "out.log"
    with open(out, "w+") as sink:
        parent = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                  stdout=sink, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while "imported" not in out.read_text():
            assert time.monotonic() < deadline and parent.poll() is None, out.read_text()
            time.sleep(0.2)
        child_pid = int(out.read_text().split()[0])
        try:
            parent.communicate("go\n", timeout=30)
            deadline = time.monotonic() + 60
            while Path(f"/proc/{child_pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            text = out.read_text()
        finally:
            _kill_if_alive([child_pid])
    assert "its launcher (pid" in text and "is gone" in text, text
    assert "guard let an orphan train" not in text, text


def test_a_killed_command_has_let_go_of_its_locks_when_the_runner_returns(tmp_path: Path) -> None:
    """A timed-out command whose "rank" (own session, deaf to SIGTERM) holds a flock, as a training holds its
    run lock: when run_streaming raises, that process is gone and the lock is free, so a retry that starts
    at once is not refused (mirotrain/training/run_lock.py)."""
    import fcntl

    from tasks._subprocess import CommandTimedOut, run_streaming

    lock = tmp_path / "run.lock"
    rank = textwrap.dedent(f"""
        import fcntl, os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", os.getpid(), flush=True)
        time.sleep(600)
    """)
    launcher = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {rank!r}], "
                f"start_new_session=True); time.sleep(600)")
    lines: list[str] = []
    with pytest.raises(CommandTimedOut):
        run_streaming([sys.executable, "-c", launcher], log=lines.append, timeout_s=20, grace_s=1)
    rank_pid = int(next(line for line in lines if line.startswith("locked")).split()[1])
    try:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the rank still holds it
        finally:
            os.close(fd)
        stat = Path(f"/proc/{rank_pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        _kill_if_alive([rank_pid])



def test_death_signal_reaches_a_child_whose_starting_thread_ended() -> None:
    """PR_SET_PDEATHSIG through the prctl resolved at import (the fork-to-exec function loads nothing)."""
    import threading

    from tasks._subprocess import _set_pdeathsig

    started: list[subprocess.Popen] = []
    starter = threading.Thread(target=lambda: started.append(subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=_set_pdeathsig)))
    starter.start()
    starter.join()
    assert started[0].wait(timeout=30) == -signal.SIGTERM


def test_a_command_is_stopped_as_soon_as_its_stop_check_gives_a_reason(tmp_path: Path) -> None:
    from tasks._subprocess import CommandAbandoned, run_streaming, stop_when

    flag = tmp_path / "abandoned"
    t0 = time.monotonic()
    with pytest.raises(CommandAbandoned, match="^launch 1 was abandoned; killed"):
        with stop_when(lambda: "launch 1 was abandoned" if flag.exists() else None, every_s=0.2):
            run_streaming([sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); "
                                                 f"time.sleep(600)"], log=lambda _: None, grace_s=1)
    assert time.monotonic() - t0 < 60
