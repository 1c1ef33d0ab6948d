"""Rendezvous resolution from every source (tasks/_rendezvous.py): precedence, refusals, torchrun arguments,
and the one-line error for a torchrun that failed in its rendezvous. Pure functions: no processes."""

from __future__ import annotations

import pytest

from tasks._rendezvous import (DEFAULT_TIMEOUT_S, RendezvousConfigError, RendezvousFailed, engine_command,
                               rendezvous_failure, resolve_rendezvous)
from tasks._subprocess import CommandFailed

TORCHRUN = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "23456", "NNODES": "4", "NODE_RANK": "2"}
PET = {"PET_MASTER_ADDR": "pet-master", "PET_MASTER_PORT": "24000", "PET_NNODES": "3", "PET_NODE_RANK": "1",
       "PET_NPROC_PER_NODE": "8"}
PLATFORM = {"WORKER_0_HOST": "job-0.svc", "WORKER_0_PORT": "25000", "WORKER_NUM": "4", "ROLE_INDEX": "2",
            "WORKER_GPU": "8"}
SLURM = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-10]",
         "SLURM_GPUS_ON_NODE": "8"}


def _values(r) -> tuple:
    return r.nnodes, r.node_rank, r.master_addr, r.master_port, r.nproc_per_node


def test_torchrun_variables() -> None:
    r = resolve_rendezvous(nproc_per_node=2, env=TORCHRUN)
    assert _values(r) == (4, 2, "10.0.0.5", 23456, 2)
    assert r.origins["nnodes"] == "NNODES" and r.origins["master_addr"] == "MASTER_ADDR"
    assert r.origins["nproc_per_node"] == "parameter" and r.source == "parameters+torchrun"


def test_pet_variables_win_over_plain_torchrun_names_of_the_same_meaning() -> None:
    r = resolve_rendezvous(env={**PET, "MASTER_ADDR": "plain", "MASTER_PORT": "1"})
    assert _values(r) == (3, 1, "pet-master", 24000, 8)
    assert r.origin("master_port") == "PET_MASTER_PORT"
    assert resolve_rendezvous(env={**PET, "PET_NNODES": "3:3"}).nnodes == 3  # torchrun's min:max, fixed size
    # Kubeflow's default nprocPerNode "auto" leaves the count to the node (here: no GPU -> one process)
    assert resolve_rendezvous(env={**PET, "PET_NPROC_PER_NODE": "auto"}).nproc_per_node >= 1


def test_kubeflow_v1_world_size_and_rank_are_node_count_and_rank() -> None:
    env = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}
    r = resolve_rendezvous(nproc_per_node=1, env=env)
    assert (r.nnodes, r.node_rank, r.origin("nnodes"), r.origin("node_rank")) == (3, 2, "WORLD_SIZE", "RANK")
    # newer operators count processes in WORLD_SIZE and say how many per node
    r = resolve_rendezvous(env={**env, "WORLD_SIZE": "8", "PET_NPROC_PER_NODE": "4", "RANK": "1"})
    assert (r.nnodes, r.node_rank, r.nproc_per_node) == (2, 1, 4)
    with pytest.raises(RendezvousConfigError, match="WORLD_SIZE=6 is not a multiple of PET_NPROC_PER_NODE=4"):
        resolve_rendezvous(env={**env, "WORLD_SIZE": "6", "PET_NPROC_PER_NODE": "4"})
    # inside a torchrun worker WORLD_SIZE/RANK count processes: not read as nodes
    assert resolve_rendezvous(nproc_per_node=1, env={**env, "LOCAL_RANK": "0"}).nnodes == 1


def test_platform_worker_variables() -> None:
    r = resolve_rendezvous(env=PLATFORM)
    assert _values(r) == (4, 2, "job-0.svc", 25000, 8) and r.source == "kubernetes"
    assert resolve_rendezvous(master_port=30000, env=PLATFORM).source == "parameters+kubernetes"


def test_slurm_variables() -> None:
    r = resolve_rendezvous(env=SLURM)
    assert _values(r) == (4, 2, "gpu07", 29500 + 1234 % 1000, 8) and r.source == "slurm"
    assert r.origin("master_addr") == "SLURM_JOB_NODELIST (first host)"
    # the usual sbatch line `export MASTER_ADDR=$(scontrol show hostnames | head -1)` takes precedence
    assert resolve_rendezvous(env={**SLURM, "MASTER_ADDR": "login-picked"}).master_addr == "login-picked"
    assert resolve_rendezvous(env={**SLURM, "SLURM_GPUS_ON_NODE": "h100:4"}).nproc_per_node == 4


def test_precedence_parameters_torchrun_platform_slurm_defaults() -> None:
    everything = {**SLURM, **PLATFORM, **TORCHRUN}
    r = resolve_rendezvous(master_addr="pinned", env=everything)
    assert (r.master_addr, r.master_port, r.origin("master_port")) == ("pinned", 23456, "MASTER_PORT")
    assert r.nproc_per_node == 8 and r.origin("nproc_per_node") == "WORKER_GPU"  # torchrun names none
    no_torchrun = resolve_rendezvous(env={**SLURM, **PLATFORM})
    assert (no_torchrun.master_addr, no_torchrun.origin("nnodes")) == ("job-0.svc", "WORKER_NUM")
    d = resolve_rendezvous(env={})
    assert (d.nnodes, d.node_rank, d.master_addr, d.master_port, d.source) == (1, 0, "127.0.0.1", 29500, "defaults")
    assert d.timeout_s == DEFAULT_TIMEOUT_S and d.origin("timeout_s") == "default"


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 nodes but no master address: set MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "m"}, "NNODES=2 nodes but no node rank: set NODE_RANK"),
    ({"NODE_RANK": "1", "MASTER_ADDR": "m"}, "NODE_RANK=1 but no node count is set"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "m"}, "NODE_RANK=2 is not below NNODES=2"),
    ({**SLURM, "NODE_RANK": "0"}, "contradictory node rank: NODE_RANK=0 but SLURM_NODEID=2"),
    ({**PLATFORM, "NNODES": "2"}, "contradictory node count: NNODES=2 but WORKER_NUM=4"),
    ({"PET_NNODES": "1:4", "MASTER_ADDR": "m", "NODE_RANK": "0"}, "PET_NNODES='1:4' is an elastic range"),
    ({"NNODES": "two"}, "NNODES='two' is not an integer"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({"MIROTRAIN_RDZV_TIMEOUT_S": "soon"}, "MIROTRAIN_RDZV_TIMEOUT_S='soon' is not a number"),
])
def test_contradictory_or_half_specified_settings_are_refused_in_one_line(env: dict, message: str) -> None:
    with pytest.raises(RendezvousConfigError) as err:
        resolve_rendezvous(nproc_per_node=1, env=env)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_explicit_parameter_settles_a_contradiction() -> None:
    assert resolve_rendezvous(node_rank=2, env={**SLURM, "NODE_RANK": "0"}).node_rank == 2


def test_torchrun_arguments_carry_the_static_endpoint_and_timeout() -> None:
    r = resolve_rendezvous(env={**TORCHRUN, "PET_NPROC_PER_NODE": "2", "MIROTRAIN_RDZV_TIMEOUT_S": "45"})
    cmd = engine_command(["sft", "--config", "c.yaml"], r)
    tail = cmd[cmd.index("torch.distributed.run") + 1:]
    flags = dict(zip(tail[:-5:2], tail[1:-5:2]))
    assert flags == {"--nproc_per_node": "2", "--nnodes": "4", "--node_rank": "2", "--master_addr": "10.0.0.5",
                     "--master_port": "23456", "--rdzv_backend": "static", "--rdzv_endpoint": "10.0.0.5:23456",
                     "--rdzv_conf": "timeout=45"}
    assert tail[-5:] == ["-m", "mirotrain", "sft", "--config", "c.yaml"]
    assert resolve_rendezvous(rdzv_timeout_s=7, env={"MIROTRAIN_RDZV_TIMEOUT_S": "45"}).timeout_s == 7


def test_rendezvous_failure_names_the_master_and_its_variables() -> None:
    r = resolve_rendezvous(nproc_per_node=1, rdzv_timeout_s=20,
                           env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.255.255.1", "MASTER_PORT": "29555"})
    tail = ['  File ".../static_tcp_rendezvous.py", line 67, in next_rendezvous',
            "torch.distributed.DistNetworkError: The client socket has timed out after 20000ms while trying to "
            "connect to (10.255.255.1, 29555)."]
    err = rendezvous_failure(CommandFailed(1, ["torchrun"], tail), r)
    assert isinstance(err, RendezvousFailed)
    assert str(err).startswith("node 1 of 2 could not rendezvous with the master 10.255.255.1:29555 (address from "
                               "MASTER_ADDR, port from MASTER_PORT) within 20s (DistNetworkError: The client socket")
    assert "No training process was started" in str(err) and "\n" not in str(err)
    # a failure after the rendezvous (a rank crashed) is left as it is
    assert rendezvous_failure(CommandFailed(1, ["torchrun"], ["RuntimeError: CUDA out of memory"]), r) is None


def test_refusals_name_an_explicit_parameter_as_a_parameter() -> None:
    with pytest.raises(RendezvousConfigError, match=r"^nnodes=2 \(parameter\) nodes but no master address"):
        resolve_rendezvous(nnodes=2, node_rank=0, nproc_per_node=1, env={})
    with pytest.raises(RendezvousConfigError, match=r"^node_rank=3 \(parameter\) is not below NNODES=2"):
        resolve_rendezvous(node_rank=3, nproc_per_node=1, env={"NNODES": "2", "MASTER_ADDR": "m"})
