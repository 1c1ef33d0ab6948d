"""Where torchrun finds its peers, from parameters or the scheduler's environment, and what a failed meeting means.

Each of the five values (``nnodes``, ``node_rank``, ``master_addr``, ``master_port``, ``nproc_per_node``) is
taken from the first of these sources that gives it:

1. explicit parameters (the task's arguments, the flows' ``launch``): pin one value, inherit the rest;
2. torchrun's own variables: ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``,
   ``PET_NPROC_PER_NODE`` (what torchrun reads for its flags; Kubeflow's PyTorchJob sets them), then
   ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, then ``WORLD_SIZE``/``RANK`` as the node count
   and node rank (Kubeflow PyTorchJob v1: one pod per node; when ``PET_NPROC_PER_NODE`` is a number the
   operator counts processes in ``WORLD_SIZE``, so it is divided by it). ``WORLD_SIZE``/``RANK`` are not
   read when ``NNODES``/``NODE_RANK`` are set, nor inside a torchrun worker (``LOCAL_RANK`` set), where they
   count processes;
3. the MiroTrain platform's ``WORKER_NUM``, ``ROLE_INDEX``, ``WORKER_0_HOST``, ``WORKER_0_PORT``, ``WORKER_GPU``;
4. Slurm, inside a job (``SLURM_JOB_ID``): ``SLURM_NNODES``, ``SLURM_NODEID``, the first host of
   ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``, port 29500 + job id % 1000, ``SLURM_GPUS_ON_NODE``;
5. defaults: one node, 127.0.0.1:29500, every visible GPU (one process on a CPU host).

Settings that cannot work are refused with one line naming the variables (:class:`RendezvousConfigError`):
two variables that disagree on the node count or the node rank (a stale ``NODE_RANK`` exported into a
Slurm job, say: the higher source would otherwise silently win), more than one node without a master
address or without a node rank (each node would train on its own), a node rank outside the node count, an
elastic range such as ``PET_NNODES=1:4`` (the launcher uses torchrun's static rendezvous; ``2:2`` is two
nodes), a value that is not a number.

The rendezvous waits at most ``timeout_s`` (parameter, else ``MIROTRAIN_RDZV_TIMEOUT_S``, else 300 s; torchrun's
own default is 600 s) for every node; :func:`rendezvous_failure` turns torchrun's traceback into one line
naming the master address and where it came from.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_PORT = 29500
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_VARIABLE = "MIROTRAIN_RDZV_TIMEOUT_S"
FIELDS = ("nnodes", "node_rank", "master_addr", "master_port", "nproc_per_node")
# Values of PET_NPROC_PER_NODE that mean "decide on this node" (Kubeflow's default is "auto").
_DETECT_NPROC = ("auto", "gpu")


class RendezvousConfigError(ValueError):
    """The rendezvous settings contradict each other or leave a multi-node launch half specified."""


class RendezvousFailed(RuntimeError):
    """torchrun's nodes did not meet (wrong master address or port, a node that never came): nothing trained."""


@dataclass(frozen=True)
class Rendezvous:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    timeout_s: float = DEFAULT_TIMEOUT_S
    # field -> where its value came from: "parameter", a variable name ("NNODES") or "default"
    origins: Mapping[str, str] = field(default_factory=dict)

    def origin(self, name: str) -> str:
        return self.origins.get(name, "default")

    @property
    def source(self) -> str:
        """The kinds of source that gave any value, e.g. ``parameters+kubernetes`` (``defaults`` if none)."""
        groups = [_group_of(self.origin(name)) for name in FIELDS]
        found = [g for g in ("parameters", "torchrun", "kubernetes", "slurm") if g in groups]
        return "+".join(found) or "defaults"

    def master(self) -> str:
        """``host:port (from VAR, VAR)``: what an operator needs to see when the nodes do not meet."""
        return (f"{self.master_addr}:{self.master_port} (address from {self.origin('master_addr')}, "
                f"port from {self.origin('master_port')})")

    def describe(self) -> str:
        """One log line with every value and its origin."""
        return (f"nnodes={self.nnodes} ({self.origin('nnodes')}) node_rank={self.node_rank} "
                f"({self.origin('node_rank')}) nproc_per_node={self.nproc_per_node} ({self.origin('nproc_per_node')}) "
                f"master={self.master()} timeout={self.timeout_s:g}s ({self.origin('timeout_s')})")

    def torchrun_args(self) -> list[str]:
        """Arguments for ``torchrun``: static rendezvous at node 0's address, bounded by ``timeout_s``.

        Backend and endpoint are passed explicitly so ``PET_RDZV_BACKEND``/``PET_RDZV_ENDPOINT`` left in the
        environment (Kubeflow's elastic mode sets them) cannot send torchrun somewhere else.
        """
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return ["--nproc_per_node", str(self.nproc_per_node), "--nnodes", str(self.nnodes),
                "--node_rank", str(self.node_rank), "--master_addr", self.master_addr,
                "--master_port", str(self.master_port), "--rdzv_backend", "static",
                "--rdzv_endpoint", f"{host}:{self.master_port}", "--rdzv_conf", f"timeout={math.ceil(self.timeout_s)}"]


def _group_of(origin: str) -> str:
    if origin == "parameter":
        return "parameters"
    if origin.startswith(("PET_", "NNODES", "NODE_RANK", "MASTER_", "WORLD_SIZE", "RANK")):
        return "torchrun"
    if origin.startswith(("WORKER_", "ROLE_INDEX")):
        return "kubernetes"
    if origin.startswith("SLURM_"):
        return "slurm"
    return "defaults"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03`` (what ``scontrol show hostnames`` prints first)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise RendezvousConfigError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _say(name: str, origin: str, value: object) -> str:
    """``NNODES=2`` for a variable, ``nnodes=2 (parameter)`` for an explicit parameter: what an error shows."""
    return f"{name}={value} (parameter)" if origin == "parameter" else f"{origin}={value}"


def _int(value: object, origin: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise RendezvousConfigError(f"{origin}={value!r} is not an integer") from None


def _slurm_gpus(value: str) -> str:
    return value.split("(")[0].split(":")[-1]  # Slurm may say "4(x2)" or "h100:4"


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    return next(((name, env[name]) for name in names if env.get(name, "").strip()), None)


def _environment_candidates(env: Mapping[str, str]) -> dict[str, list[tuple[object, str]]]:
    """Per field, the (value, origin) pairs the environment offers, highest precedence first."""
    out: dict[str, list[tuple[object, str]]] = {name: [] for name in FIELDS}

    def offer(name: str, variable: str) -> None:
        if env.get(variable, "").strip():
            out[name].append((env[variable].strip(), variable))

    nproc = env.get("PET_NPROC_PER_NODE", "").strip()
    if nproc and nproc not in _DETECT_NPROC:
        out["nproc_per_node"].append((nproc, "PET_NPROC_PER_NODE"))
    for name, variables in (("nnodes", ("PET_NNODES", "NNODES")), ("node_rank", ("PET_NODE_RANK", "NODE_RANK")),
                            ("master_addr", ("PET_MASTER_ADDR", "MASTER_ADDR")),
                            ("master_port", ("PET_MASTER_PORT", "MASTER_PORT"))):
        for variable in variables:
            offer(name, variable)
    in_torchrun_worker = "LOCAL_RANK" in env
    if not out["nnodes"] and env.get("WORLD_SIZE", "").strip() and not in_torchrun_worker:
        world = _int(env["WORLD_SIZE"], "WORLD_SIZE")
        if nproc.isdigit() and int(nproc) > 0:
            if world % int(nproc):
                raise RendezvousConfigError(f"WORLD_SIZE={world} is not a multiple of PET_NPROC_PER_NODE={nproc}")
            out["nnodes"].append((world // int(nproc), f"WORLD_SIZE/PET_NPROC_PER_NODE={world}/{nproc}"))
        else:
            out["nnodes"].append((world, "WORLD_SIZE"))
    if not out["node_rank"] and not in_torchrun_worker:
        offer("node_rank", "RANK")

    for name, variable in (("nnodes", "WORKER_NUM"), ("node_rank", "ROLE_INDEX"), ("master_addr", "WORKER_0_HOST"),
                           ("master_port", "WORKER_0_PORT"), ("nproc_per_node", "WORKER_GPU")):
        offer(name, variable)

    if env.get("SLURM_JOB_ID", "").strip():
        for name, variables in (("nnodes", ("SLURM_NNODES", "SLURM_JOB_NUM_NODES")), ("node_rank", ("SLURM_NODEID",)),
                                ("nproc_per_node", ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"))):
            hit = _first(env, *variables)
            if hit:
                out[name].append((_slurm_gpus(hit[1]) if name == "nproc_per_node" else hit[1], hit[0]))
        nodelist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
        if nodelist:
            out["master_addr"].append((first_slurm_host(nodelist[1]), f"{nodelist[0]} (first host)"))
        job_id = _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID")
        out["master_port"].append((DEFAULT_PORT + job_id % 1000, "SLURM_JOB_ID (29500 + id % 1000)"))
    return out


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: a CPU host
        return 0


def _node_value(value: object, origin: str) -> int:
    """A node count or node rank. torchrun's ``N:N`` (min = max) is a count of N; an elastic range (``1:4``)
    is refused: the launcher's rendezvous is static."""
    if isinstance(value, str) and ":" in value:
        low, _, high = value.partition(":")
        if low.strip() != high.strip():
            raise RendezvousConfigError(f"{origin}={value!r} is an elastic range; the launcher uses torchrun's "
                                        f"static rendezvous: give one node count")
        value = low
    return _int(value, origin)


def _check_agreement(name: str, offers: list[tuple[object, str]]) -> None:
    """Two variables that give different node counts (or node ranks) mean a misconfigured job: refuse it."""
    values: dict[int, str] = {}
    for value, origin in offers:
        values.setdefault(_node_value(value, origin), origin)
    if len(values) > 1:
        shown = " but ".join(f"{origin}={value}" for value, origin in values.items())
        what = {"nnodes": "node count", "node_rank": "node rank"}[name]
        raise RendezvousConfigError(f"contradictory {what}: {shown}; unset the stale variable or pass {name} "
                                    f"explicitly")


def resolve_rendezvous(nproc_per_node: int | None = None, nnodes: int | None = None, node_rank: int | None = None,
                       master_addr: str | None = None, master_port: int | None = None,
                       rdzv_timeout_s: float | None = None, env: Mapping[str, str] | None = None) -> Rendezvous:
    """Combine parameters with the scheduler's environment (precedence and refusals: module docstring)."""
    env = os.environ if env is None else env
    explicit = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "node_rank": node_rank,
                "master_addr": master_addr, "master_port": master_port}
    offers = _environment_candidates(env)
    chosen: dict[str, object] = {}
    origins: dict[str, str] = {}
    for name in FIELDS:
        if explicit[name] is not None:
            chosen[name], origins[name] = explicit[name], "parameter"
            continue
        if name in ("nnodes", "node_rank"):
            _check_agreement(name, offers[name])
        if offers[name]:
            chosen[name], origins[name] = offers[name][0]

    n = _nnodes(chosen, origins)
    rank = _node_value(chosen["node_rank"], origins["node_rank"]) if "node_rank" in chosen else 0
    if n > 1 and "master_addr" not in chosen:
        raise RendezvousConfigError(f"{_say('nnodes', origins['nnodes'], n)} nodes but no master address: set "
                                    f"MASTER_ADDR (or PET_MASTER_ADDR, WORKER_0_HOST) to node 0's address, or pass "
                                    f"master_addr")
    if n > 1 and "node_rank" not in chosen:
        raise RendezvousConfigError(f"{_say('nnodes', origins['nnodes'], n)} nodes but no node rank: set NODE_RANK "
                                    f"(or PET_NODE_RANK, ROLE_INDEX) on every node, or pass node_rank")
    if rank < 0:
        raise RendezvousConfigError(f"{_say('node_rank', origins['node_rank'], rank)} is negative")
    if rank >= n and "nnodes" not in chosen:
        raise RendezvousConfigError(f"{_say('node_rank', origins['node_rank'], rank)} but no node count is set (one "
                                    f"node): set NNODES (or PET_NNODES, WORKER_NUM) or pass nnodes")
    if rank >= n:
        raise RendezvousConfigError(f"{_say('node_rank', origins['node_rank'], rank)} is not below "
                                    f"{_say('nnodes', origins['nnodes'], n)}")
    port = _int(chosen.get("master_port", DEFAULT_PORT), origins.get("master_port", "default"))
    if not 0 < port < 65536:
        raise RendezvousConfigError(f"{_say('master_port', origins['master_port'], port)} is not a TCP port")
    if "nproc_per_node" in chosen:
        nproc = _int(chosen["nproc_per_node"], origins["nproc_per_node"])
    else:
        nproc, origins["nproc_per_node"] = max(_local_gpu_count(), 1), "visible GPUs"
    if nproc < 1:
        raise RendezvousConfigError(f"{_say('nproc_per_node', origins['nproc_per_node'], nproc)}: need at least one "
                                    f"process per node")
    timeout, origins["timeout_s"] = _timeout(rdzv_timeout_s, env)
    return Rendezvous(nproc_per_node=nproc, nnodes=n, node_rank=rank,
                      master_addr=str(chosen.get("master_addr", "127.0.0.1")).strip(), master_port=port,
                      timeout_s=timeout, origins=origins)


def _nnodes(chosen: dict[str, object], origins: dict[str, str]) -> int:
    if "nnodes" not in chosen:
        return 1
    origin = origins["nnodes"]
    n = _node_value(chosen["nnodes"], origin)
    if n < 1:
        raise RendezvousConfigError(f"{_say('nnodes', origin, n)}: need at least one node")
    return n


def _timeout(rdzv_timeout_s: float | None, env: Mapping[str, str]) -> tuple[float, str]:
    if rdzv_timeout_s is not None:
        value, origin = rdzv_timeout_s, "parameter"
    elif env.get(TIMEOUT_VARIABLE, "").strip():
        origin = TIMEOUT_VARIABLE
        try:
            value = float(env[TIMEOUT_VARIABLE])
        except ValueError:
            raise RendezvousConfigError(f"{TIMEOUT_VARIABLE}={env[TIMEOUT_VARIABLE]!r} is not a number") from None
    else:
        return DEFAULT_TIMEOUT_S, "default"
    if not value > 0:
        raise RendezvousConfigError(f"rendezvous timeout from {origin} must be positive, not {value}")
    return float(value), origin


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


# What torchrun prints when its agent fails before any worker starts: the static rendezvous's TCPStore
# (static_tcp_rendezvous.py, next_rendezvous) or a dynamic backend's own errors.
_RDZV_MARKERS = ("next_rendezvous", "RendezvousTimeoutError", "RendezvousConnectionError", "RendezvousClosedError")
_CAUSE = re.compile(r"(?:torch\.distributed\.)?(Dist\w*Error|Rendezvous\w*Error|TimeoutError): (.+)")


def rendezvous_failure(exc: BaseException, rdzv: Rendezvous) -> RendezvousFailed | None:
    """The one-line error for a torchrun that failed in its rendezvous; None for any other failure."""
    from tasks._subprocess import CommandFailed

    if not isinstance(exc, CommandFailed) or not any(m in line for line in exc.tail for m in _RDZV_MARKERS):
        return None
    causes = [f"{m.group(1)}: {m.group(2).rstrip('.')}" for line in exc.tail if (m := _CAUSE.search(line))]
    cause = causes[-1] if causes else f"torchrun exit code {exc.returncode}"
    hint = ("node 0 hosts the rendezvous: the address must be this node's own, reachable from every node"
            if rdzv.node_rank == 0 else "check that node 0 runs and that this address reaches it from here")
    return RendezvousFailed(
        f"node {rdzv.node_rank} of {rdzv.nnodes} could not rendezvous with the master {rdzv.master()} within "
        f"{rdzv.timeout_s:g}s ({cause}); {hint}. No training process was started")
