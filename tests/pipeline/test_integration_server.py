"""Integration: a real Prefect server, deployments from deployments/prefect.yaml (created with the commands of
docs/pipeline.md's setup block), a process worker, and `prefect deployment run 'post-train/adhoc'` of the
embedded default three times: two new runs, each training all its steps into run directories of its own,
then a run with ``resume_from`` that continues the first.

Marked ``integration`` (17.5 minutes on the shared, loaded 2-core development machine). Everything runs in a temporary PREFECT_HOME on
127.0.0.1 and every process it starts is stopped at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_docs_setup import setup_block

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGINT (graceful for the worker and server), then SIGTERM, then SIGKILL of the process group."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _reset_sigint() -> None:  # a background child may inherit SIGINT=ignored, and ignore _stop's SIGINT
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_deployment_run_post_train(tmp_path: Path) -> None:
    import httpx

    from pipelines.demo import demo_parameters, prepare_demo_inputs

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PREFECT_SERVER_EPHEMERAL_ENABLED="false", MIROTRAIN_ROOT=str(REPO),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               PREFECT_WORKER_QUERY_SECONDS="2", TOKENIZERS_PARALLELISM="false")
    prefect = [sys.executable, "-m", "prefect"]
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []

    def background(name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=_reset_sigint)
        started.append(p)
        return p

    def cli(*args: str, timeout: float = 180) -> str:
        r = subprocess.run([*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    try:
        server = background("server", [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                       "--analytics-off"])
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not come up"
            time.sleep(1)

        block_env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])}
        for tokens in setup_block():  # the block's own commands for the pool and the deployments
            if tokens[0] == "prefect" and ("work-pool" in tokens or "deploy" in tokens):
                r = subprocess.run(tokens, env=block_env, cwd=REPO, capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, f"{' '.join(tokens)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        deployments = cli("deployment", "ls")
        for name in ("post-train/adhoc", "post-train/nightly", "sft/adhoc", "dpo/adhoc"):
            assert name in deployments, deployments
        cli("automation", "create", "--from-file", "deployments/automation-rerun-crashed.yaml")
        background("worker", [*prefect, "worker", "start", "--pool", "mirotrain-process", "--limit", "1"])

        work = tmp_path / "work"
        params = demo_parameters(work, prepare_demo_inputs(work))
        planned = {"sft": _planned(params["sft_stage"]), "dpo": _planned(params["dpo_stage"])}

        def run_deployment(extra: dict) -> dict:
            """`prefect deployment run` as an operator types it; waits for the end; returns the flow run."""
            run_args = [a for k, v in {**params, **extra}.items() for a in ("--param", f"{k}={json.dumps(v)}")]
            out = cli("deployment", "run", "post-train/adhoc", *run_args)
            print(out)
            run_id = next(tok for line in out.splitlines() if "UUID" in line for tok in line.split() if tok.count("-") == 4)
            deadline = time.monotonic() + 1500  # 3-4 min alone on 2 cores; far more on a shared machine
            while time.monotonic() < deadline:
                run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
                if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(5)
            assert run["state"]["type"] == "COMPLETED", (
                f"flow run ended {run['state']['type']}\nworker log:\n{(logs / 'worker.log').read_text()[-6000:]}")
            return run

        def artifacts_of(run: dict) -> dict[str, dict]:
            found = httpx.post(f"{api}/artifacts/filter", timeout=10,
                               json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}).json()
            return {a["key"]: a for a in found if a.get("key")}

        names = []
        for _ in range(2):  # two runs of the same deployment in a row: each trains everything, apart
            run = run_deployment({})
            name = f"{run['name']}-{run['id'].replace('-', '')[:8]}"
            names.append(name)
            for recipe, steps in planned.items():
                run_dir = work / "runs" / recipe / name
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                logged = [r["step"] for r in rows if "loss" in r]
                assert logged[0] == 1 and logged[-1] == steps, (recipe, name, logged)
                assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps
            export = work / "export" / name
            assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
            parent = artifacts_of(run)
            for key in ("post-train-summary", "post-train-stages", "post-train-export", "post-train-sft-run-dir",
                        "post-train-dpo-run-dir"):
                assert key in parent, sorted(parent)
            assert f"({export.resolve().as_uri()})" in parent["post-train-export"]["data"]  # a markdown link
            summary = parent["post-train-summary"]["data"]
            assert name in summary and str(export.resolve()) in summary
            stages = parent["post-train-stages"]["data"]
            assert "SFT run" in stages and "DPO run" in stages and "data:image/png;base64," in stages
            print(f"\n--- post-train-summary of {name} ---\n{summary}\n--- post-train-export link: "
                  f"{parent['post-train-export']['data']}")
        assert names[0] != names[1]
        assert sorted(p.name for p in (work / "runs" / "sft").iterdir()) == sorted(names)

        # resume_from, by the flow-run name an operator reads in the UI: continues the first run, no new directory
        resumed = run_deployment({"resume_from": names[0][:-9]})
        assert names[0] in artifacts_of(resumed)["post-train-summary"]["data"]
        assert sorted(p.name for p in (work / "runs" / "sft").iterdir()) == sorted(names)

        stage_keys = ["sft-summary", "dpo-summary", "sft-metrics", "dpo-metrics", "sft-loss-curve", "dpo-loss-curve",
                      "sft-progress", "dpo-progress", "sft-run-dir", "dpo-run-dir"]  # on the subflow runs
        found = httpx.post(f"{api}/artifacts/filter", timeout=10,
                           json={"artifacts": {"key": {"any_": stage_keys}}, "limit": 200}).json()
        assert sorted({a["key"] for a in found}) == sorted(stage_keys), found
    finally:
        for p in reversed(started):  # worker before server
            _stop(p)


def _planned(stage: dict) -> int:
    """epochs x max_steps_per_epoch from a stage's overrides (the demo caps both)."""
    values = dict(o.split("=", 1) for o in stage["overrides"])
    return int(values["epochs"]) * int(values["max_steps_per_epoch"])
