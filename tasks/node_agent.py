"""The multi-node entry: every node of one job runs ``python -m tasks.node_agent [--] COMMAND ...``.

Which node this is comes from the same rendezvous rules as the train task (``tasks/_rendezvous.py``:
``NODE_RANK``, ``PET_NODE_RANK``, ``ROLE_INDEX``, ``SLURM_NODEID``, ...).

- Node 0 runs COMMAND: on Kubernetes the worker's ``prefect flow-run execute`` (the one flow run of the job),
  on Slurm ``python -m tasks.train ...``. Its train steps start torchrun as node 0 and publish every launch
  in the job's launch directory (``MIROTRAIN_LAUNCH_DIR``, ``tasks/_launch_spec.py``). When COMMAND ends,
  node 0 writes ``FINISHED`` there and exits with COMMAND's exit code. SIGTERM and SIGINT are passed on to
  COMMAND, so the flow run handles a pod eviction as it would without this wrapper.
- Every other node waits for node 0's launches and runs each one through the train task's own launcher
  (``tasks.train.run_engine``) with its own node rank and node 0's master address, port and engine
  arguments. A launch that fails here is logged and the agent waits for the next one (node 0's task owns
  retries: its retry is a new launch). While a launch runs, the agent checks every few seconds whether node 0
  is still in it (:func:`why_stop`): once node 0 marked it done, published a newer launch or finished, or its
  flow run is final, the agent kills this node's torchrun and ranks and moves on. Without that, ranks whose
  peers on node 0 died could hang in a collective until the NCCL timeout while node 0's retry waits for the
  agents' acknowledgements only ``rdzv.timeout_s``. The agent exits 0 when node 0 wrote ``FINISHED`` or, where
  ``PREFECT__FLOW_RUN_ID`` and the API are available, when that flow run reached a final state.

With one node, COMMAND simply replaces this process. Several nodes without a launch directory, or a
rendezvous setting that is refused (``tasks/_rendezvous.py``), end every node at once with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from tasks._launch_spec import (FINISHED, LAUNCH_DIR_VARIABLE, LaunchSpec, acknowledge, finish, finished, is_done,
                                launch_dir, published_seqs, read_spec)
from tasks._rendezvous import Rendezvous, RendezvousConfigError, resolve_rendezvous
from tasks._runtime import apply_prefect_env_defaults, run_logger


def lead(command: Sequence[str], directory: Path) -> int:
    """Node 0: run ``command`` as a child (signals forwarded), then tell the agents it finished."""
    proc = subprocess.Popen(list(command))

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finish(directory, rc)
    run_logger().info(f"node 0: command exited with {rc}; wrote {directory / FINISHED}")
    return rc


def _flow_run_final(flow_run_id: str) -> bool:
    """True when the flow run is Completed, Failed, Crashed or Cancelled; False if the API cannot say."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception as exc:  # noqa: BLE001 - an unreachable API must not end the agent; FINISHED still will
        run_logger().warning(f"cannot read flow run {flow_run_id}: {exc}")
        return False
    return state is not None and state.is_final()


def why_stop(directory: Path, seq: int, flow_run_final: Callable[[], bool] = lambda: False) -> str | None:
    """Why this node should stop its part of launch ``seq`` now, or None while node 0 is still in it."""
    if finished(directory):
        return f"node 0 finished (launch {seq} is over)"
    if is_done(directory, seq):
        return f"node 0 ended launch {seq}"
    newer = [s for s in published_seqs(directory) if s > seq]
    if newer:
        return f"node 0 abandoned launch {seq} for launch {newer[-1]}"
    if flow_run_final():
        return f"the flow run is in a final state (launch {seq} is over)"
    return None


def _rate_limited(check: Callable[[], bool], every_s: float) -> Callable[[], bool]:
    """``check`` asked at most once per ``every_s`` seconds (an API call); False in between."""
    next_at = time.monotonic() + every_s

    def limited() -> bool:
        nonlocal next_at
        if time.monotonic() < next_at:
            return False
        next_at = time.monotonic() + every_s
        return check()

    return limited


def run_launch(directory: Path, spec: LaunchSpec, rdzv: Rendezvous, flow_run_id: str | None = None,
               check_s: float = 3.0, api_check_s: float = 30.0) -> None:
    """Run node 0's launch ``spec`` on this node, through the train task's launcher, until it ends or node 0
    leaves it (:func:`why_stop`, asked every ``check_s`` seconds)."""
    from tasks._subprocess import CommandAbandoned, stop_when
    from tasks.train import run_engine

    logger = run_logger()
    flow_run_final = _rate_limited(lambda: _flow_run_final(flow_run_id), api_check_s) if flow_run_id else (
        lambda: False)
    acknowledge(directory, spec.seq, rdzv.node_rank)
    logger.info(f"node {rdzv.node_rank}: launch {spec.seq}: {' '.join(spec.args[:3])} ...")
    if Path(spec.cwd).is_dir():
        os.chdir(spec.cwd)  # relative config paths in the engine arguments mean node 0's directory
    try:
        with stop_when(lambda: why_stop(directory, spec.seq, flow_run_final), every_s=check_s):
            run_engine(spec.args, nproc_per_node=spec.nproc_per_node, nnodes=spec.nnodes, node_rank=rdzv.node_rank,
                       master_addr=spec.master_addr, master_port=spec.master_port, launcher=spec.launcher,
                       timeout_s=spec.timeout_s, env=spec.env, rdzv_timeout_s=spec.rdzv_timeout_s)
    except CommandAbandoned as exc:
        logger.warning(f"node {rdzv.node_rank}: stopped launch {spec.seq}: {str(exc).splitlines()[0]}")
    except (RuntimeError, TimeoutError) as exc:  # a failed or timed-out torchrun; a refused setting propagates
        logger.error(f"node {rdzv.node_rank}: launch {spec.seq} failed: {str(exc).splitlines()[0]}")


def follow(directory: Path, rdzv: Rendezvous, flow_run_id: str | None = None, poll_s: float = 1.0,
           api_check_s: float = 30.0) -> int:
    """Nodes 1..N-1: run each new launch node 0 publishes until node 0 (or its flow run) is finished."""
    logger = run_logger()
    logger.info(f"node {rdzv.node_rank} of {rdzv.nnodes}: following launches in {directory}")
    last = 0
    next_api_check = time.monotonic() + api_check_s
    while True:
        if finished(directory):
            logger.info(f"node {rdzv.node_rank}: node 0 finished; exiting")
            return 0
        if flow_run_id and time.monotonic() > next_api_check:
            if _flow_run_final(flow_run_id):
                logger.info(f"node {rdzv.node_rank}: flow run {flow_run_id} is in a final state; exiting")
                return 0
            next_api_check = time.monotonic() + api_check_s
        pending = [s for s in published_seqs(directory) if s > last and not is_done(directory, s)] \
            if directory.is_dir() else []
        if pending:
            last = pending[-1]  # an older launch without its done marker was abandoned by node 0
            run_launch(directory, read_spec(directory, last), rdzv, flow_run_id, api_check_s=api_check_s)
            continue
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.node_agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--poll-s", type=float, default=1.0, help="how often an agent looks for node 0's launches")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="what node 0 runs (e.g. prefect flow-run execute)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    apply_prefect_env_defaults()
    try:
        rdzv = resolve_rendezvous()
    except RendezvousConfigError as exc:
        print(f"node_agent: {exc}", file=sys.stderr, flush=True)
        return 2
    directory = launch_dir()
    if rdzv.node_rank == 0 and not command:
        print("node_agent: node 0 needs the command to run (e.g. prefect flow-run execute)", file=sys.stderr)
        return 2
    if rdzv.nnodes == 1:
        os.execvp(command[0], command)
    if directory is None:
        print(f"node_agent: node {rdzv.node_rank} of {rdzv.nnodes}: set {LAUNCH_DIR_VARIABLE} to a directory that "
              f"all nodes of this job share (and no other job)", file=sys.stderr)
        return 2
    if rdzv.node_rank == 0:
        return lead(command, directory)
    # SIGTERM (pod deletion, scancel) unwinds through the launcher, which kills torchrun and its ranks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return follow(directory, rdzv, os.environ.get("PREFECT__FLOW_RUN_ID"), poll_s=args.poll_s)
    except RendezvousConfigError as exc:
        print(f"node_agent: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
