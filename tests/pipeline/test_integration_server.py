"""Integration: a real Prefect server, deployments from deployments/prefect.yaml, a process worker, and a
`prefect deployment run 'post-train/adhoc'` of the embedded default, waited on until Completed.

Marked ``integration`` (several minutes on 2 cores). Everything runs in a temporary PREFECT_HOME on
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

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


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


def _reset_sigint() -> None:  # a background child may inherit SIGINT=ignored (prefect-notes P6)
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

        cli("work-pool", "create", "mirotrain-process", "--type", "process")
        cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", timeout=300)
        deployments = cli("deployment", "ls")
        for name in ("post-train/adhoc", "post-train/nightly", "sft/adhoc", "dpo/adhoc"):
            assert name in deployments, deployments
        cli("automation", "create", "--from-file", "deployments/automation-rerun-crashed.yaml")
        background("worker", [*prefect, "worker", "start", "--pool", "mirotrain-process", "--limit", "1"])

        work = tmp_path / "work"
        params = demo_parameters(work, prepare_demo_inputs(work))
        run_args = [a for k, v in params.items() for a in ("--param", f"{k}={json.dumps(v)}")]
        out = cli("deployment", "run", "post-train/adhoc", *run_args)
        run_id = next(tok for line in out.splitlines() if "UUID" in line for tok in line.split() if tok.count("-") == 4)

        deadline = time.monotonic() + 1500
        state = None
        while time.monotonic() < deadline:
            run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
            state = run["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(5)
        assert state == "COMPLETED", f"flow run ended {state}\nworker log:\n{(logs / 'worker.log').read_text()[-6000:]}"

        artifacts = httpx.post(f"{api}/artifacts/filter", json={"limit": 200}, timeout=10).json()
        keys = {a.get("key") for a in artifacts}
        for key in ("post-train-summary", "sft-summary", "dpo-summary", "sft-metrics", "dpo-metrics",
                    "sft-loss-curve", "dpo-loss-curve", "sft-progress", "dpo-progress"):
            assert key in keys, sorted(k for k in keys if k)
        export = Path(params["export_dir"])
        assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    finally:
        for p in reversed(started):  # worker before server (prefect-notes P6)
            _stop(p)
