"""A crashed post-train flow run is rescheduled once by the crash automation, resumes, and completes.

Real parts only: a Prefect server, the deployments of deployments/prefect.yaml, the automation of
deployments/automation-rerun-crashed.yaml and a process worker, all in a temporary PREFECT_HOME on
127.0.0.1. The flow-run process is SIGKILLed while SFT trains, after its first step checkpoint; the test
then checks what an operator relies on: one reschedule, a Completed run, SFT resumed from its checkpoint
(the engine's summary.json says where it started and how few steps the last attempt trained) and reached its
planned steps, and no task or subflow run of the crashed attempt left open. The automation's limits are checked in
test_crash_automation_server.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from prefect_stack import FINAL_STATES, PrefectStack

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]

RESCHEDULE_MESSAGE = "Rescheduled after a crash by the mirotrain re-run automation"
SFT_STEPS = 6
OPEN = {"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"}


def _flow_run_process(run_id: str) -> int | None:
    """Pid of the process executing flow run ``run_id`` (the worker passes the id in its environment)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    return None


def _post(stack: PrefectStack, path: str, body: dict) -> list[dict]:
    r = stack.api.post(path, json=body)
    r.raise_for_status()
    return r.json()


def _subflow_runs(stack: PrefectStack, root: str) -> list[dict]:
    found, level = [], [root]
    while level:
        runs = _post(stack, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": level}}, "limit": 200})
        found += runs
        level = [r["id"] for r in runs]
    return found


def test_crashed_post_train_is_rerun_once_and_resumes(demo_inputs: dict, tmp_path: Path) -> None:
    from pipelines.demo import demo_parameters

    with PrefectStack(tmp_path) as stack:
        stack.cli("work-pool", "create", "mirotrain-process", "--type", "process")
        stack.cli("--no-prompt", "deploy", "--name", "post-train/adhoc", "--prefect-file", "deployments/prefect.yaml")
        stack.cli("automation", "create", "--from-file", "deployments/automation-rerun-crashed.yaml")
        stack.background("worker", ["worker", "start", "--pool", "mirotrain-process", "--limit", "1"])
        work = tmp_path / "work"
        params = demo_parameters(work, demo_inputs)
        params["sft_stage"]["overrides"] += [f"max_steps_per_epoch={SFT_STEPS}", "checkpoint_steps_for_auto_resume=2"]
        params["dpo_stage"]["overrides"] += ["max_steps_per_epoch=2", "checkpoint_steps_for_auto_resume=2"]
        run_id = stack.run_deployment("post-train/adhoc", params)

        # Kill the flow-run process once SFT has a complete step checkpoint (and before it finishes).
        sft_base = Path(params["sft_stage"]["output_dir"])
        deadline = time.monotonic() + 900
        while not list(sft_base.glob("*/checkpoints/step_*/COMPLETE")):
            state = stack.state(run_id)
            assert state not in FINAL_STATES, f"flow run ended {state} before SFT checkpointed\n{stack.log('worker')}"
            assert time.monotonic() < deadline, f"no SFT step checkpoint after 900 s\n{stack.log('worker')}"
            time.sleep(0.5)
        flow_pid = _flow_run_process(run_id)
        assert flow_pid, "flow-run process not found"
        os.kill(flow_pid, signal.SIGKILL)

        state = stack.wait_final(run_id, 1200, final=("COMPLETED", "FAILED", "CANCELLED"))
        time.sleep(15)  # room for a second, late reschedule to show up in the history
        states = stack.api.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
        history = [(s["type"], s["name"], s.get("message") or "") for s in states]
        print("flow run states:\n" + "\n".join(f"  {t:<10} {n:<14} {m}" for t, n, m in history))
        print(stack.cli("flow-run", "ls", "--limit", "10"))
        assert state == "COMPLETED" and stack.state(run_id) == "COMPLETED", f"{history}\n{stack.log('worker')}"
        assert sum(t == "CRASHED" for t, _, _ in history) == 1, history
        assert sum(m == RESCHEDULE_MESSAGE for _, _, m in history) == 1, history

        subflows = _subflow_runs(stack, run_id)
        flow_run_ids = [run_id, *(s["id"] for s in subflows)]
        task_runs = _post(stack, "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200})
        runs = [*subflows, *task_runs]
        print("subflow and task runs:\n" + "\n".join(f"  {r['name']:<28} {r['state']['name']:<10} "
                                                     f"{r['state'].get('message') or ''}" for r in runs))
        assert [(r["name"], r["state"]["type"]) for r in runs if r["state"]["type"] in OPEN] == []
        closed = [r["name"] for r in runs
                  if r["state"]["type"] == "CRASHED" and "closed as Crashed" in (r["state"].get("message") or "")]
        assert any(name.startswith("train") for name in closed), closed

        run_dirs = [p for p in sft_base.iterdir() if p.is_dir()]
        assert len(run_dirs) == 1, run_dirs  # the rerun trained on in the crashed attempt's run directory
        # The engine's own record of the last attempt (mirotrain/training/trainer.py, _summary): it started from
        # a step checkpoint of the crashed attempt and trained only the steps after it.
        summary = json.loads((run_dirs[0] / "summary.json").read_text())
        assert summary["steps"] == SFT_STEPS, summary
        assert (summary["resumed_from_step"] or 0) >= 2, summary
        assert summary["steps_trained"] == SFT_STEPS - summary["resumed_from_step"] < SFT_STEPS, summary
        logs = _post(stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids},
                                                      "text": {"query": '"the engine resumes from"'}}, "limit": 200})
        resumed = [log["message"] for log in logs if "(now " in log["message"]]
        print("\n".join(resumed))
        assert any(line.startswith("sft:") for line in resumed), resumed
