"""Where torchrun finds its peers: explicit parameters, else Kubernetes or Slurm variables, else one node.

Kubernetes platforms inject ``WORKER_0_HOST``, ``WORKER_0_PORT``, ``WORKER_NUM`` (nodes), ``ROLE_INDEX``
(this node's rank) and ``WORKER_GPU`` (GPUs per node); Slurm gives ``SLURM_NNODES``, ``SLURM_NODEID``,
``SLURM_JOB_NODELIST`` and ``SLURM_GPUS_ON_NODE``. An explicit parameter always wins over the environment
so a user can pin one value (e.g. the port) and inherit the rest.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Rendezvous:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "defaults"  # "parameters" | "kubernetes" | "slurm" | "defaults": shown in the logs

    def torchrun_args(self) -> list[str]:
        """Arguments for ``torchrun`` (static rendezvous: every node knows node 0's address)."""
        return ["--nproc_per_node", str(self.nproc_per_node), "--nnodes", str(self.nnodes),
                "--node_rank", str(self.node_rank), "--master_addr", self.master_addr,
                "--master_port", str(self.master_port)]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03`` (what ``scontrol show hostnames`` prints first)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: a CPU host
        return 0


def resolve_rendezvous(nproc_per_node: int | None = None, nnodes: int | None = None, node_rank: int | None = None,
                       master_addr: str | None = None, master_port: int | None = None,
                       env: Mapping[str, str] | None = None) -> Rendezvous:
    """Combine parameters with the scheduler's environment; see the module docstring for precedence."""
    env = os.environ if env is None else env
    found: dict[str, object] = {}
    source = "defaults"
    if "WORKER_0_HOST" in env or "WORKER_NUM" in env:
        source = "kubernetes"
        found = {"master_addr": env.get("WORKER_0_HOST"), "master_port": env.get("WORKER_0_PORT"),
                 "nnodes": env.get("WORKER_NUM"), "node_rank": env.get("ROLE_INDEX"),
                 "nproc_per_node": env.get("WORKER_GPU")}
    elif "SLURM_JOB_ID" in env and ("SLURM_NNODES" in env or "SLURM_JOB_NUM_NODES" in env):
        source = "slurm"
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        found = {"master_addr": env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else None),
                 "master_port": env.get("MASTER_PORT") or DEFAULT_PORT + int(env["SLURM_JOB_ID"]) % 1000,
                 "nnodes": env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES"),
                 "node_rank": env.get("SLURM_NODEID"),
                 "nproc_per_node": env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE")}
    else:
        found = {"master_addr": env.get("MASTER_ADDR"), "master_port": env.get("MASTER_PORT")}
    explicit = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "node_rank": node_rank,
                "master_addr": master_addr, "master_port": master_port}
    if any(v is not None for v in explicit.values()):
        source = "parameters" if source == "defaults" else f"parameters+{source}"
    merged = {k: (explicit[k] if explicit[k] is not None else found.get(k)) for k in explicit}
    gpus = merged["nproc_per_node"]
    if gpus is not None and isinstance(gpus, str):
        gpus = gpus.split("(")[0].split(":")[-1]  # Slurm may say "4(x2)" or "h100:4"
    nproc = int(gpus) if gpus not in (None, "", "0") else max(_local_gpu_count(), 1)
    return Rendezvous(nproc_per_node=nproc, nnodes=int(merged["nnodes"] or 1), node_rank=int(merged["node_rank"] or 0),
                      master_addr=str(merged["master_addr"] or "127.0.0.1"),
                      master_port=int(merged["master_port"] or DEFAULT_PORT), source=source)


def engine_command(args: list[str], rdzv: Rendezvous, launcher: str = "auto") -> list[str]:
    """The command that runs ``mirotrain <args>`` on this node.

    ``launcher="auto"`` uses torchrun whenever there is more than one process in the job and a plain
    ``python -m mirotrain`` for one process (the engine's single-process mode: no launcher overhead, and what
    the CPU tests run). torchrun is started as ``python -m torch.distributed.run`` so it is always the one in
    this interpreter's environment.
    """
    if launcher not in ("auto", "torchrun", "python"):
        raise ValueError(f"launcher must be auto, torchrun or python, not {launcher!r}")
    single = rdzv.nproc_per_node * rdzv.nnodes == 1
    if launcher == "python" or (launcher == "auto" and single):
        if not single:
            raise ValueError("launcher=python runs one process; use torchrun for nproc_per_node*nnodes > 1")
        return [sys.executable, "-m", "mirotrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", *rdzv.torchrun_args(), "-m", "mirotrain", *args]
