"""A real Prefect server for the server tests: a temporary PREFECT_HOME on 127.0.0.1, the CLI pointed at it,
and background processes (server, worker) that are all stopped at the end, pass or fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline_helpers import REPO
from ports import free_port

FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")



def _reset_sigint() -> None:  # a background child may inherit SIGINT=ignored, and then the worker never stops
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGINT (graceful for the worker and server), then SIGTERM, then SIGKILL of the process group."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


class PrefectStack:
    """``with PrefectStack(tmp_path) as stack:`` starts the server; ``stack.cli(...)`` runs the Prefect CLI
    against it, ``stack.background(...)`` starts a process (e.g. the worker) stopped on exit, ``stack.api``
    is an HTTP client on its REST API."""

    def __init__(self, root: Path):
        import httpx

        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.url = f"http://127.0.0.1:{free_port()}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_API_URL=self.url,
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                        PREFECT_SERVER_EPHEMERAL_ENABLED="false", MIROTRAIN_ROOT=str(REPO),
                        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                        PREFECT_WORKER_QUERY_SECONDS="2", TOKENIZERS_PARALLELISM="false")
        self.api = httpx.Client(base_url=self.url, timeout=15)
        self._started: list[subprocess.Popen] = []

    def __enter__(self) -> "PrefectStack":
        try:
            self._start_server()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self._started):  # worker before server
            _stop(p)
        self.api.close()

    def _start_server(self) -> None:
        import httpx

        port = self.url.rsplit(":", 1)[1].split("/")[0]
        server = self.background("server", ["server", "start", "--host", "127.0.0.1", "--port", port, "--analytics-off"])
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, self.log("server")
            try:
                if self.api.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not come up"
            time.sleep(1)

    def background(self, name: str, prefect_args: list[str]) -> subprocess.Popen:
        """``prefect <prefect_args>`` in the background, its output in ``logs/<name>.log``."""
        with open(self.logs / f"{name}.log", "w") as out:
            p = subprocess.Popen([sys.executable, "-m", "prefect", *prefect_args], env=self.env, cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_reset_sigint)
        self._started.append(p)
        return p

    def log(self, name: str, chars: int = 6000) -> str:
        return (self.logs / f"{name}.log").read_text()[-chars:]

    def cli(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run([sys.executable, "-m", "prefect", *args], env=self.env, cwd=REPO, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    def run_deployment(self, name: str, params: dict[str, Any]) -> str:
        """``prefect deployment run NAME --param k=<json> ...``; returns the new flow run's id."""
        args = [a for k, v in params.items() for a in ("--param", f"{k}={json.dumps(v)}")]
        out = self.cli("deployment", "run", name, *args)
        return next(tok for line in out.splitlines() if "UUID" in line for tok in line.split() if tok.count("-") == 4)

    def state(self, flow_run_id: str) -> str:
        r = self.api.get(f"/flow_runs/{flow_run_id}")
        r.raise_for_status()
        return r.json()["state"]["type"]

    def wait_final(self, flow_run_id: str, timeout_s: float, final: tuple[str, ...] = FINAL_STATES) -> str:
        """The flow run's state type once it is one of ``final``; fails with the worker's log after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (state := self.state(flow_run_id)) not in final:
            assert time.monotonic() < deadline, f"flow run still {state} after {timeout_s:.0f} s\n{self.log('worker')}"
            time.sleep(3)
        return state
