"""Close what a crashed attempt left open, when its flow run runs again.

A SIGKILLed or OOM-killed flow process cannot report the end of anything it was running. The worker marks
the flow run Crashed, but its task runs (``train`` above all) and its subflow runs (``sft``, ``dpo``) stay
Running in the UI forever. When the same flow run runs again -- the crash automation
(deployments/automation-rerun-crashed.yaml) or ``prefect flow-run retry`` reschedules it, keeping its id --
:func:`close_crashed_attempts`, called first thing in the flow body, marks everything an earlier attempt
left in a non-final state as Crashed, with a message that says why, before this attempt creates any work.
This is housekeeping: when the API refuses any of it, a warning says what stayed open and the attempt
goes on to train.
"""

from datetime import datetime
from typing import Any, Callable, Sequence
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import PrefectException
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.states import Crashed

# Everything a run can be left in when its process dies; the final ones are COMPLETED, FAILED, CANCELLED, CRASHED.
OPEN_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
_PAGE = 200  # the API's largest page


def _read_all(read: Callable[..., list[Any]], **filters: Any) -> list[Any]:
    rows: list[Any] = []
    while True:
        page = read(**filters, limit=_PAGE, offset=len(rows))
        rows += page
        if len(page) < _PAGE:
            return rows


def _subflow_runs(client: SyncPrefectClient, root: UUID) -> list[FlowRun]:
    """Every flow run started inside ``root``, at any depth, from every attempt."""
    found: list[FlowRun] = []
    level = [root]
    while level:
        runs = _read_all(client.read_flow_runs,
                         flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=level)))
        found += runs
        level = [r.id for r in runs]
    return found


def _open_before(runs: Sequence[Any], attempt_start: datetime) -> list[Any]:
    """The runs an earlier attempt created and never finished (this attempt's own runs start after it)."""
    return [r for r in runs if r.state is not None and r.state.type in OPEN_STATES and r.created < attempt_start]


def close_crashed_attempts() -> list[str]:
    """In a flow run's second or later attempt: mark the task and subflow runs an earlier attempt left open
    as Crashed. Returns ``"<kind> <name>"`` for each run it closed (those closed before an API error, if one
    stops it); nothing happens on a first attempt or outside a flow run.
    """
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.run_count <= 1:
        return []
    run = ctx.flow_run
    closed: list[str] = []
    try:
        _close_open_runs(run, closed)
    except (PrefectException, httpx.HTTPError, OSError, RuntimeError) as exc:  # the API refused or is unreachable
        get_run_logger().warning(f"attempt {run.run_count}: could not close the runs a crashed attempt left open "
                                 f"({type(exc).__name__}: {exc}); they stay as they are, training goes on")
    if closed:
        get_run_logger().warning(f"attempt {run.run_count}: closed {len(closed)} run(s) of a crashed attempt "
                                 f"as Crashed: {', '.join(closed)}")
    return closed


def _close_open_runs(run: FlowRun, closed: list[str]) -> None:
    """Mark ``run``'s open subflow and task runs from earlier attempts Crashed, appending each to ``closed``."""
    attempt_start = run.state.timestamp if run.state else datetime.now().astimezone()
    message = (f"Left open when attempt {run.run_count - 1} of flow run {run.name!r} ended without reporting "
               f"(its process died); closed as Crashed by attempt {run.run_count}.")
    with get_client(sync_client=True) as client:
        subflows = _subflow_runs(client, run.id)
        for sub in _open_before(subflows, attempt_start):
            client.set_flow_run_state(sub.id, Crashed(message=message), force=True)
            closed.append(f"flow run {sub.name}")
        open_filter = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id, *(s.id for s in subflows)]),
                                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=OPEN_STATES)))
        for task_run in _open_before(_read_all(client.read_task_runs, task_run_filter=open_filter), attempt_start):
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            closed.append(f"task run {task_run.name}")
