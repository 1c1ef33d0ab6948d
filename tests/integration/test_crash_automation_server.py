"""The crash automation of deployments/automation-rerun-crashed.yaml on a real Prefect server (temporary
PREFECT_HOME on 127.0.0.1): a run's states are driven through the API to check its limits -- one reschedule
per crash, whatever the worker reports twice, and none after the second rerun crashes too. Most of its time
is the automation's 90 s wait, so it lives in a file of its own that a parallel test worker runs beside
test_crash_rerun_server.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from prefect_stack import PrefectStack

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]


def _set_state(stack: PrefectStack, flow_run_id: str, state: dict, force: bool = False) -> str:
    r = stack.api.post(f"/flow_runs/{flow_run_id}/set_state", json={"state": state, "force": force})
    r.raise_for_status()
    return r.json()["status"]


def test_crash_automation_reschedules_once_per_crash_and_gives_up(tmp_path: Path) -> None:
    """The worker's duplicate crash report is refused and no third rerun follows a crash of attempt 3."""
    with PrefectStack(tmp_path) as stack:
        stack.cli("automation", "create", "--from-file", "deployments/automation-rerun-crashed.yaml")
        flow_id = stack.api.post("/flows/", json={"name": "post-train"}).json()["id"]
        deployment = stack.api.post("/deployments/", json={"name": "automation-check", "flow_id": flow_id}).json()["id"]
        run_id = stack.api.post(f"/deployments/{deployment}/create_flow_run", json={}).json()["id"]

        def crash_attempt(wait_s: float) -> list[str]:
            """Run then crash the flow run the way a process worker reports it; the state names that follow
            once the automation has rescheduled it, or after ``wait_s``."""
            assert _set_state(stack, run_id, {"type": "RUNNING"}, force=True) == "ACCEPT"
            assert _set_state(stack, run_id, {"type": "CRASHED", "message": "Process exited with status code: -9."}) == "ACCEPT"
            # the worker's second report of the same crash: refused while the run is Crashed
            assert _set_state(stack, run_id, {"type": "CRASHED", "message": "Flow run infrastructure exited"}) == "ABORT"
            deadline = time.monotonic() + wait_s  # the automation waits 90 s, then acts
            while stack.state(run_id) == "CRASHED" and time.monotonic() < deadline:
                time.sleep(2)
            states = stack.api.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
            return [s["name"] for s in states]

        assert crash_attempt(180)[-2:] == ["Crashed", "AwaitingRetry"]
        assert crash_attempt(180)[-2:] == ["Crashed", "AwaitingRetry"]
        third = crash_attempt(130)
        print("states:", third)
        assert third[-1] == "Crashed" and third.count("AwaitingRetry") == 2, third
