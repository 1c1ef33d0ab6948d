"""Rendezvous resolution and the supervised child-process runner (no Prefect API, no engine)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tasks._rendezvous import engine_command, first_slurm_host, resolve_rendezvous
from tasks._subprocess import CommandFailed, CommandTimedOut, run_streaming


def test_rendezvous_kubernetes_env() -> None:
    env = {"WORKER_0_HOST": "job-0.svc", "WORKER_0_PORT": "23456", "WORKER_NUM": "4", "ROLE_INDEX": "2", "WORKER_GPU": "8"}
    r = resolve_rendezvous(env=env)
    assert (r.master_addr, r.master_port, r.nnodes, r.node_rank, r.nproc_per_node, r.source) == (
        "job-0.svc", 23456, 4, 2, 8, "kubernetes")
    pinned = resolve_rendezvous(master_port=30000, env=env)
    assert pinned.master_port == 30000 and pinned.nnodes == 4 and pinned.source == "parameters+kubernetes"


def test_rendezvous_slurm_env() -> None:
    env = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_GPUS_ON_NODE": "8"}
    r = resolve_rendezvous(env=env)
    assert (r.master_addr, r.nnodes, r.node_rank, r.nproc_per_node, r.source) == ("gpu07", 2, 1, 8, "slurm")
    assert r.master_port == 29500 + 1234 % 1000
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("a[3,5-9]") == "a3"


def test_rendezvous_defaults_and_command() -> None:
    r = resolve_rendezvous(nproc_per_node=1, env={})
    assert (r.nnodes, r.node_rank, r.master_addr) == (1, 0, "127.0.0.1")
    assert engine_command(["sft", "--config", "x.yaml"], r) == [sys.executable, "-m", "mirotrain", "sft", "--config", "x.yaml"]
    two = resolve_rendezvous(nproc_per_node=2, env={})
    cmd = engine_command(["sft"], two)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node" in cmd
    with pytest.raises(ValueError):
        engine_command(["sft"], two, launcher="python")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) is not alive
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


# Like torchrun: the launcher starts its worker in a session of its own (out of reach of a group kill), and
# with ignore_term it also ignores SIGTERM, so only the SIGKILL escalation over the tree snapshot works.
_TREE = """
import signal, subprocess, sys, time
if "ignore_term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("grandchild", child.pid, flush=True)
for i in range(1, 1000):
    print(f"step {i}/1000", flush=True)
    time.sleep(0.2)
"""


@pytest.mark.slow  # child processes
def test_run_streaming_streams_and_maps_exit_code() -> None:
    seen: list[str] = []
    assert run_streaming([sys.executable, "-c", "print('a'); print('b')"], log=seen.append) == 0
    assert seen == ["a", "b"]
    with pytest.raises(CommandFailed) as err:
        run_streaming([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log=lambda s: None)
    assert err.value.returncode == 3 and "boom" in str(err.value)


@pytest.mark.slow  # a tree of child processes
@pytest.mark.parametrize("how", ["timeout", "exception", "ignore_term"])
def test_run_streaming_kills_whole_tree(how: str) -> None:
    """A timeout or an exception in the waiting thread (what Prefect's cancellation raises) kills the tree."""
    pids: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith("grandchild"):
            pids.append(int(line.split()[1]))
        if how != "timeout" and line.startswith("step 3/"):
            raise KeyboardInterrupt  # stands in for prefect's TerminationSignal: any BaseException

    t0 = time.monotonic()
    with pytest.raises(CommandTimedOut if how == "timeout" else KeyboardInterrupt):
        run_streaming([sys.executable, "-c", _TREE, how], log=lambda s: None, on_line=on_line,
                      on_start=pids.append, timeout_s=2.0 if how == "timeout" else None, grace_s=2.0)
    assert time.monotonic() - t0 < 15
    leader, grandchild = pids[0], pids[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_alive(leader) or _alive(grandchild)):
        time.sleep(0.1)
    assert not _alive(leader) and not _alive(grandchild)
