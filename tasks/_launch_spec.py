"""How node 0 tells the other nodes of a multi-node job what to launch: spec files on the shared run volume.

Only node 0 runs the flow; the other nodes run ``tasks/node_agent.py``, which knows nothing of the pipeline.
Every time the flow starts the engine (SFT, the DPO reference pass, DPO, and every retry of each), node 0's
launcher, inside :func:`node_launch`:

1. writes ``launch-<seq>.json`` into the job's launch directory (``MIROTRAIN_LAUNCH_DIR``, shared by the
   nodes of one job and by no other job): the engine arguments, node 0's working directory, the rendezvous
   values every node must share, the launcher settings;
2. waits until every other node has acknowledged it (``launch-<seq>.node-<rank>``), so no node starts an
   older launch after node 0 has moved on, and a node agent that is missing fails the launch with a clear
   line instead of a rendezvous timeout;
3. runs torchrun as node 0, then writes ``launch-<seq>.done``; agents never start a launch marked done.

When node 0's command ends, ``tasks/node_agent.py`` writes ``FINISHED`` (with its exit code) and the agents
exit. The directory holds only small JSON files; it must not be the training ``output_dir``.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from tasks._rendezvous import Rendezvous, RendezvousFailed, rendezvous_failure

LAUNCH_DIR_VARIABLE = "MIROTRAIN_LAUNCH_DIR"
FINISHED = "FINISHED"


class FollowersMissing(RuntimeError):
    """Some node agents never picked up node 0's launch: they are not running or see another launch directory."""


@dataclass(frozen=True)
class LaunchSpec:
    """One engine launch, as node 0 resolved it; the agents pass these values as explicit launcher parameters."""

    seq: int
    args: list[str]
    cwd: str
    nnodes: int
    master_addr: str
    master_port: int
    nproc_per_node: int | None  # only when node 0 had it as a parameter; else each node resolves its own
    launcher: str
    timeout_s: float | None
    env: dict[str, str] = field(default_factory=dict)
    rdzv_timeout_s: float | None = None  # only when node 0 had it as a parameter; else each node's environment


def launch_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The job's launch directory, or None when the nodes are not coordinated through one."""
    value = (os.environ if env is None else env).get(LAUNCH_DIR_VARIABLE, "").strip()
    return Path(value) if value else None


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # readers never see half a file


def spec_path(directory: Path, seq: int) -> Path:
    return directory / f"launch-{seq:06d}.json"


def published_seqs(directory: Path) -> list[int]:
    """Sequence numbers of every published launch, oldest first."""
    return sorted(int(p.stem.split("-")[1]) for p in directory.glob("launch-*.json"))


def publish(directory: Path, spec_fields: dict) -> LaunchSpec:
    """Write the next launch (sequence number one past the newest) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    seq = (published_seqs(directory) or [0])[-1] + 1
    spec = LaunchSpec(seq=seq, **spec_fields)
    _write_json(spec_path(directory, seq), asdict(spec))
    return spec


def read_spec(directory: Path, seq: int) -> LaunchSpec:
    return LaunchSpec(**json.loads(spec_path(directory, seq).read_text()))


def is_done(directory: Path, seq: int) -> bool:
    return spec_path(directory, seq).with_suffix(".done").exists()


def acknowledge(directory: Path, seq: int, node_rank: int) -> None:
    """Written by an agent just before it starts launch ``seq``."""
    _write_json(spec_path(directory, seq).with_suffix(f".node-{node_rank}"), {"pid": os.getpid(), "time": time.time()})


def wait_for_followers(directory: Path, seq: int, nnodes: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until nodes 1..nnodes-1 acknowledged launch ``seq``; :class:`FollowersMissing` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(1, nnodes) if not spec_path(directory, seq).with_suffix(f".node-{r}").exists()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise FollowersMissing(
                f"node(s) {', '.join(map(str, missing))} of {nnodes} did not pick up launch {seq} in {directory} "
                f"within {timeout_s:g}s: is `python -m tasks.node_agent` running on every node, with the same "
                f"{LAUNCH_DIR_VARIABLE}? No training process was started")
        time.sleep(poll_s)


def finish(directory: Path, returncode: int) -> None:
    """Node 0's command ended (perhaps before its first launch, e.g. a config error): the agents may exit."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / FINISHED, {"returncode": returncode, "time": time.time()})


def finished(directory: Path) -> bool:
    return (directory / FINISHED).exists()


@contextmanager
def node_launch(args: list[str], rdzv: Rendezvous, *, launcher: str, timeout_s: float | None,
                env: Mapping[str, str] | None) -> Iterator[None]:
    """Wrap one engine launch on any node (the body runs torchrun).

    On node 0 of a multi-node job with a launch directory, publish the launch, wait for the agents'
    acknowledgements, and mark the launch done afterwards. On every node, a torchrun that failed in its
    rendezvous is reported as :class:`RendezvousFailed` (one line naming the master address and its source).
    """
    directory = launch_dir()
    spec = None
    if rdzv.nnodes > 1 and rdzv.node_rank == 0 and directory is not None:
        spec = publish(directory, {
            "args": list(args), "cwd": os.getcwd(), "nnodes": rdzv.nnodes, "master_addr": rdzv.master_addr,
            "master_port": rdzv.master_port,
            "nproc_per_node": rdzv.nproc_per_node if rdzv.origin("nproc_per_node") == "parameter" else None,
            "launcher": launcher, "timeout_s": timeout_s, "env": dict(env or {}),
            "rdzv_timeout_s": rdzv.timeout_s if rdzv.origin("timeout_s") == "parameter" else None})
    try:
        if spec is not None:
            wait_for_followers(directory, spec.seq, rdzv.nnodes, rdzv.timeout_s)
        yield
    except Exception as err:
        failure: RendezvousFailed | None = rendezvous_failure(err, rdzv)
        if failure is None:
            raise
        raise failure from err
    finally:
        if spec is not None:
            _write_json(spec_path(directory, spec.seq).with_suffix(".done"), {"time": time.time()})
