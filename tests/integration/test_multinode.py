"""Multi-node through the node entry the Kubernetes template and the Slurm script run (tasks/node_agent.py).

Two "nodes" on localhost (CPU, gloo, one process each): node 0 runs the train task's CLI as its command and
publishes the launch, node 1 is a node agent that follows it. Together they must train exactly what one
node with two processes trains; with a wrong master address they must fail in bounded time, say where the
address came from, and leave the output directory untouched. The protocol's edges (a missing agent, done
launches, the end of the job) are checked without processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline_helpers import REPO, processes_mentioning, tiny_stage_overrides
from ports import free_port
from tasks._launch_spec import FollowersMissing, finish, node_launch, publish, published_seqs, spec_path
from tasks._rendezvous import resolve_rendezvous
from tasks.node_agent import follow, run_launch, why_stop

STEPS = ["epochs=1", "max_steps_per_epoch=4", "checkpoint_steps_for_auto_resume=2"]



def _node_env(rank: int, master_addr: str, port: int, launch_dir: Path, extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "SLURM_", "WORKER_"))
           and k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "ROLE_INDEX")}
    return {**env, "PYTHONPATH": str(REPO), "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(port), "PET_NPROC_PER_NODE": "1", "MIROTRAIN_LAUNCH_DIR": str(launch_dir), **extra}


def _two_nodes(train_cli: list[str], master_addr: str, launch_dir: Path, log_dir: Path,
               extra_env: dict[str, str] | None = None) -> tuple[list[int], list[str], float]:
    """Start node 0 and node 1 exactly as the pods start (same command on both), wait; (codes, outputs, seconds)."""
    port = free_port()
    entry = [sys.executable, "-m", "tasks.node_agent", "--poll-s", "0.2", "--", *train_cli]
    t0 = time.monotonic()
    procs = []
    for rank in (0, 1):
        log = open(log_dir / f"node{rank}.log", "w")
        env = _node_env(rank, master_addr, port, launch_dir, extra_env or {})
        procs.append((subprocess.Popen(entry, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
    codes = []
    try:
        for proc, log in procs:
            codes.append(proc.wait(timeout=700))
            log.close()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    elapsed = time.monotonic() - t0
    return codes, [(log_dir / f"node{r}.log").read_text() for r in (0, 1)], elapsed


def _train_cli(config: str, overrides: list[str], output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tasks.train", "--no-prefect", "--recipe", "sft", "--config", config,
            "--output-dir", str(output_dir), *extra, "--overrides", *overrides]


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def _weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted((output_dir / "hf" / "final").glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no HF export under {output_dir}"
    return tensors


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_nodes_train_exactly_what_one_node_with_two_processes_trains(demo_inputs: dict, tmp_path: Path) -> None:
    """Two launchers with NNODES=2 and NODE_RANK=0/1 on localhost (the launcher code the Kubernetes template
    runs) train what one node with two processes trains. Same world size (2), same global ranks, same data
    shards, gloo on CPU: a two-rank sum is the same in either order, so losses and final weights must be
    bit-identical, and are compared exactly."""
    import torch

    config, overrides = tiny_stage_overrides(demo_inputs, "sft", tmp_path, STEPS)
    two, one = tmp_path / "two-nodes", tmp_path / "one-node"
    codes, logs, elapsed = _two_nodes(_train_cli(config, overrides, two), "127.0.0.1", tmp_path / "launch", tmp_path)
    print(f"2 nodes x 1 process: {elapsed:.0f}s")
    assert codes == [0, 0], f"node 0:\n{logs[0][-4000:]}\nnode 1:\n{logs[1][-4000:]}"
    assert "node 1: launch 1: sft" in logs[1] and "--nnodes 2 --node_rank 1" in logs[1]  # node 1's own torchrun
    assert "node 0 finished; exiting" in logs[1]

    t0 = time.monotonic()
    single = subprocess.run(_train_cli(config, overrides, one, "--nproc-per-node", "2", "--master-port",
                                       str(free_port())), cwd=REPO, capture_output=True, text=True, timeout=700,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    print(f"1 node x 2 processes: {time.monotonic() - t0:.0f}s")
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    assert _losses(two) == _losses(one) and len(_losses(one)) == 4
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wrong_master_address_fails_fast_names_its_source_and_writes_nothing(demo_inputs: dict, tmp_path: Path) -> None:
    """Two nodes given an unroutable master address fail within the rendezvous timeout, with a message that
    names where the address came from, and write nothing into the output directory."""
    config, overrides = tiny_stage_overrides(demo_inputs, "sft", tmp_path, STEPS)
    out = tmp_path / "never-trained"
    codes, logs, elapsed = _two_nodes(_train_cli(config, overrides, out), "10.255.255.1", tmp_path / "launch",
                                      tmp_path, {"MIROTRAIN_RDZV_TIMEOUT_S": "20"})
    print(f"wrong master address: both nodes done in {elapsed:.0f}s")
    assert codes[0] != 0 and codes[1] == 0, logs
    message = [line for line in logs[0].splitlines() if line.startswith("train: RendezvousFailed")]
    assert message, logs[0][-4000:]
    print(message[0])
    assert "could not rendezvous with the master 10.255.255.1:" in message[0]
    assert "(address from MASTER_ADDR, port from MASTER_PORT) within 20s" in message[0]
    # node 1 either hits its own rendezvous timeout or, node 0 having given launch 1 up first, stops it
    assert re.search(r"launch 1 failed: node 1 of 2 could not rendezvous with the master 10\.255\.255\.1"
                     r"|stopped launch 1: node 0 (ended launch 1|finished)", logs[1]), logs[1]
    assert elapsed < 150, f"took {elapsed:.0f}s"
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


# Node 0's command in the test below: the post-train flow on the embedded default, two steps per stage.
_POST_TRAIN = """
import json, sys
from pipelines.demo import demo_parameters
from pipelines.post_train import post_train
params = demo_parameters(sys.argv[1], json.loads(sys.argv[2]))
for stage in ("sft_stage", "dpo_stage"):
    params[stage]["overrides"] += ["max_steps_per_epoch=2", "checkpoint_steps_for_auto_resume=2"]
state = post_train(**params, return_state=True)
print("post-train:", state.name, flush=True)
sys.exit(0 if state.is_completed() else 1)
"""


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_post_train_flow_runs_every_training_launch_on_both_nodes(api_env: dict, demo_inputs: dict,
                                                                  tmp_path: Path) -> None:
    """One post-train flow run on node 0; node 1's agent follows SFT, the DPO reference pass and DPO."""
    inputs = {k: demo_inputs[k] for k in ("model_source", "sft_data", "preference_data")}
    leader = [sys.executable, "-c", _POST_TRAIN, str(tmp_path / "work"), json.dumps(inputs)]
    launches = tmp_path / "launch"
    codes, logs, elapsed = _two_nodes(leader, "127.0.0.1", launches, tmp_path,
                                      {"PREFECT_API_URL": api_env["PREFECT_API_URL"]})
    print(f"post-train on 2 nodes: {elapsed:.0f}s")
    assert codes == [0, 0] and "post-train: Completed" in logs[0], f"{logs[0][-4000:]}\n{logs[1][-3000:]}"
    published = published_seqs(launches)
    assert [int(n) for n in re.findall(r"node 1: launch (\d+): ", logs[1])] == published  # all of them, in order
    commands = [json.loads(spec_path(launches, seq).read_text())["args"] for seq in published]
    recipes = [(c[0], "--precompute-only" in c) for c in commands]
    # a retried launch (a new launch with the same command) may repeat a stage
    assert [r for i, r in enumerate(recipes) if i == 0 or r != recipes[i - 1]] == [
        ("sft", False), ("dpo", True), ("dpo", False)], recipes
    assert "node 0 finished; exiting" in logs[1]


def _two_node_rdzv(rank: int) -> object:
    return resolve_rendezvous(nproc_per_node=1, rdzv_timeout_s=1.0,
                              env={"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"})


def test_node_zero_fails_in_one_line_when_no_agent_picks_up_its_launch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MIROTRAIN_LAUNCH_DIR", str(tmp_path))
    ran = []
    with pytest.raises(FollowersMissing, match=r"node\(s\) 1 of 2 did not pick up launch 1 .* within 1s"):
        with node_launch(["sft", "--config", "c.yaml"], _two_node_rdzv(0), launcher="auto", timeout_s=None, env={}):
            ran.append("torchrun")
    assert ran == [] and spec_path(tmp_path, 1).with_suffix(".done").exists()  # agents will never start it
    # node 0's rendezvous timeout was a parameter: the agents get it from the launch, as the other values
    assert json.loads(spec_path(tmp_path, 1).read_text())["rdzv_timeout_s"] == 1.0


def test_launch_parameters_reach_both_launching_tasks() -> None:
    """The flows' ``launch`` (rendezvous timeout included) maps onto train's and reference_logprobs' parameters."""
    import inspect

    from pipelines._common import launch_kwargs
    from pipelines.params import Launch
    from tasks.reference_logprobs import reference_logprobs
    from tasks.train import train

    kwargs = launch_kwargs(Launch(nnodes=2, rdzv_timeout_s=45))
    assert kwargs["rdzv_timeout_s"] == 45 and kwargs["nnodes"] == 2
    for task in (train, reference_logprobs):
        assert kwargs.keys() <= inspect.signature(task.fn).parameters.keys(), task.name


def test_agent_skips_finished_launches_and_exits_when_node_zero_finished(tmp_path: Path) -> None:
    fields = {"args": ["sft"], "cwd": str(tmp_path), "nnodes": 2, "master_addr": "127.0.0.1", "master_port": 1,
              "nproc_per_node": 1, "launcher": "auto", "timeout_s": None}
    spec = publish(tmp_path, fields)
    spec_path(tmp_path, spec.seq).with_suffix(".done").write_text("{}")
    assert publish(tmp_path, fields).seq == 2
    spec_path(tmp_path, 2).with_suffix(".done").write_text("{}")
    finish(tmp_path, 0)
    assert follow(tmp_path, _two_node_rdzv(1), poll_s=0.05) == 0
    assert not list(tmp_path.glob("*.node-1"))  # it started neither launch


def _launch_fields(port: int = 1) -> dict:
    return {"args": ["sft"], "cwd": os.getcwd(), "nnodes": 2, "master_addr": "127.0.0.1", "master_port": port,
            "nproc_per_node": 1, "launcher": "torchrun", "timeout_s": None, "rdzv_timeout_s": 300.0}


def test_agent_stops_a_launch_once_node_zero_has_left_it(tmp_path: Path) -> None:
    spec = publish(tmp_path, _launch_fields())
    assert why_stop(tmp_path, spec.seq) is None
    assert why_stop(tmp_path, spec.seq, lambda: True) == "the flow run is in a final state (launch 1 is over)"
    publish(tmp_path, _launch_fields())
    assert why_stop(tmp_path, spec.seq) == "node 0 abandoned launch 1 for launch 2"
    spec_path(tmp_path, spec.seq).with_suffix(".done").write_text("{}")
    assert why_stop(tmp_path, spec.seq) == "node 0 ended launch 1"
    finish(tmp_path, 1)
    assert why_stop(tmp_path, 2) == "node 0 finished (launch 2 is over)"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_agent_kills_its_torchrun_when_node_zero_moves_to_a_new_launch(tmp_path: Path) -> None:
    """Node 1's torchrun waits for a node 0 that is gone (its attempt died); node 0's retry publishes launch 2.
    The agent must end launch 1 -- torchrun and all -- within seconds, not at the rendezvous or NCCL timeout."""
    port = free_port()
    spec = publish(tmp_path, _launch_fields(port))

    def retry_of_node_zero() -> None:
        deadline = time.monotonic() + 120
        while not processes_mentioning(f"--master_port {port}"):
            assert time.monotonic() < deadline, "node 1's torchrun never started"
            time.sleep(0.2)
        publish(tmp_path, _launch_fields(port))

    publisher = threading.Thread(target=retry_of_node_zero, daemon=True)
    publisher.start()
    t0 = time.monotonic()
    run_launch(tmp_path, spec, _two_node_rdzv(1), check_s=1.0)
    took = time.monotonic() - t0
    publisher.join(timeout=5)
    assert published_seqs(tmp_path) == [1, 2]
    assert took < 150, f"the agent left launch 1 only after {took:.0f}s"
    assert not processes_mentioning(f"--master_port {port}"), "node 1's torchrun outlived its abandoned launch"


def test_node_zero_that_fails_before_any_launch_still_releases_the_agents(tmp_path: Path) -> None:
    """A flow that stops before training (a config typo) never created the launch directory."""
    from tasks.node_agent import lead

    directory = tmp_path / "not-yet-created"
    assert lead([sys.executable, "-c", "raise SystemExit(3)"], directory) == 3
    assert follow(directory, _two_node_rdzv(1), poll_s=0.05) == 0


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_agent_exits_when_its_flow_run_is_final(prefect_api: str, tmp_path: Path) -> None:
    """Without node 0's FINISHED marker (its pod killed outright), the agent still ends with the flow run."""
    from prefect import flow

    @flow(name="node-zero-stand-in")
    def node_zero() -> int:
        return 0

    state = node_zero(return_state=True)
    assert state.is_completed()
    rdzv = _two_node_rdzv(1)
    assert follow(tmp_path / "launch", rdzv, str(state.state_details.flow_run_id), poll_s=0.05, api_check_s=0.1) == 0


def test_node_entry_refuses_a_half_specified_job_on_every_node(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tasks.node_agent import main

    stray = ("NNODES", "NODE_RANK", "MASTER_ADDR", "WORLD_SIZE", "RANK")
    for name in list(os.environ):
        if name.startswith(("PET_", "SLURM_", "WORKER_", "MIROTRAIN_")) or name in stray:
            monkeypatch.delenv(name)
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    assert main(["--", "true"]) == 2
    assert "NNODES=2 nodes but no master address" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for rank in ("0", "1"):
        monkeypatch.setenv("NODE_RANK", rank)
        assert main(["--", "true"]) == 2
        assert f"node {rank} of 2: set MIROTRAIN_LAUNCH_DIR" in capsys.readouterr().err
