"""pipelines/_recovery.py against a real Prefect API: the second attempt of a flow run closes what the first
left open -- its task runs, its subflow runs and their task runs -- and leaves the current attempt's runs alone.

The first attempt records its runs as Running through the API and dies the way a flow does when it raises;
Prefect's flow retry then starts attempt 2 of the same flow run, as the crash automation's reschedule does.
"""

from __future__ import annotations

import asyncio

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Running

from pipelines._recovery import close_crashed_attempts

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@task
def _placeholder() -> None:
    """Stands for the task a run was executing (only its identity is used)."""


@flow(name="recovery-child")
def _child() -> None:
    """Stands for a subflow (only its identity is used)."""


@flow(name="recovery-parent", retries=1, retry_delay_seconds=0)
def _parent() -> dict[str, str]:
    run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        def open_task_run(flow_run_id, key: str):
            return client.create_task_run(_placeholder, flow_run_id, dynamic_key=key, name=key, state=Running())

        if run.run_count == 1:  # runs that an attempt dying abruptly would leave Running
            tracking = open_task_run(run.id, "child-tracking")
            child = client.create_flow_run(_child, name="child-of-attempt-1", parent_task_run_id=tracking.id,
                                           state=Running())
            open_task_run(child.id, "child-train")
            open_task_run(run.id, "train-attempt-1")
            raise RuntimeError("attempt 1 ends with its runs left open")
        current = open_task_run(run.id, "train-attempt-2")  # this attempt's own work: never closed
        closed = close_crashed_attempts()
        task_runs = client.read_task_runs()
        flow_runs = client.read_flow_runs()
    states = {r.name: r.state.type.value for r in [*task_runs, *flow_runs]}
    assert states[current.name] == "RUNNING"
    return {"closed": ", ".join(sorted(closed)), **states}


def test_second_attempt_closes_what_the_first_left_open(prefect_api: str) -> None:
    states = _parent()
    # The subflow's tracking task run in the parent follows the subflow's state on the server by itself.
    assert states["closed"] == "flow run child-of-attempt-1, task run child-train, task run train-attempt-1", states
    for name in ("child-of-attempt-1", "child-tracking", "child-train", "train-attempt-1"):
        assert states[name] == "CRASHED", (name, states)
    assert states["train-attempt-2"] == "RUNNING", states


def test_first_attempt_and_plain_calls_close_nothing(prefect_api: str) -> None:
    @flow(name="recovery-first-attempt")
    def first() -> list[str]:
        return close_crashed_attempts()

    assert first() == []
    assert close_crashed_attempts() == []  # outside a flow run


def test_an_unreachable_api_does_not_stop_the_attempt(prefect_api: str, caplog: pytest.LogCaptureFixture) -> None:
    # An async flow holds no sync API client, so close_crashed_attempts opens its own, on the setting below.
    @flow(name="recovery-api-down", retries=1, retry_delay_seconds=0)
    async def rerun() -> list[str]:
        if FlowRunContext.get().flow_run.run_count == 1:
            raise RuntimeError("attempt 1 dies")
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing listens on port 9
            return close_crashed_attempts()

    assert asyncio.run(rerun()) == []
    assert "could not close the runs a crashed attempt left open" in caplog.text
