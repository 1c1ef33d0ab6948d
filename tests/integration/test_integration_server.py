"""Integration: a real Prefect server, deployments from deployments/prefect.yaml (created with the commands of
docs/pipeline.md's setup block), a process worker, and `prefect deployment run 'post-train/adhoc'` of the
embedded default (on the tests' demo inputs, tests/prefect_fixtures.py) three times: two new runs, each
training all its steps into run directories of its own, then a run with ``resume_from`` that continues the first.

Marked ``integration`` (10 to 18 minutes on the shared 2-core development machine, by its load). Everything
runs in a temporary PREFECT_HOME on 127.0.0.1 (tests/integration/prefect_stack.py) and every process it starts is
stopped at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import REPO
from prefect_stack import PrefectStack
from test_docs_setup import setup_block

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]


def _planned(stage: dict) -> int:
    """epochs x max_steps_per_epoch from a stage's overrides (the demo caps both)."""
    values = dict(o.split("=", 1) for o in stage["overrides"])
    return int(values["epochs"]) * int(values["max_steps_per_epoch"])


def test_deployment_run_post_train(demo_inputs: dict, tmp_path: Path) -> None:
    from pipelines.demo import demo_parameters

    with PrefectStack(tmp_path) as stack:
        block_env = {**stack.env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
        for tokens in setup_block():  # the block's own commands for the pool and the deployments
            if tokens[0] == "prefect" and ("work-pool" in tokens or "deploy" in tokens):
                r = subprocess.run(tokens, env=block_env, cwd=REPO, capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, f"{' '.join(tokens)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        deployments = stack.cli("deployment", "ls")
        for name in ("post-train/adhoc", "post-train/nightly", "sft/adhoc", "dpo/adhoc"):
            assert name in deployments, deployments
        stack.cli("automation", "create", "--from-file", "deployments/automation-rerun-crashed.yaml")
        stack.background("worker", ["worker", "start", "--pool", "mirotrain-process", "--limit", "1"])

        work = tmp_path / "work"
        params = demo_parameters(work, demo_inputs)
        for stage in ("sft_stage", "dpo_stage"):  # the claims are about runs, their directories and resume,
            params[stage]["overrides"] += ["max_steps_per_epoch=4"]  # not about how long each stage trains
        planned = {"sft": _planned(params["sft_stage"]), "dpo": _planned(params["dpo_stage"])}

        def run_deployment(extra: dict) -> dict:
            """`prefect deployment run` as an operator types it; waits for the end (1500 s: 3-4 min alone on
            2 cores, far more on a shared machine); returns the flow run."""
            run_id = stack.run_deployment("post-train/adhoc", {**params, **extra})
            state = stack.wait_final(run_id, 1500)
            assert state == "COMPLETED", f"flow run ended {state}\nworker log:\n{stack.log('worker')}"
            return stack.api.get(f"/flow_runs/{run_id}").json()

        def artifacts_of(run: dict) -> dict[str, dict]:
            found = stack.api.post("/artifacts/filter",
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
        found = stack.api.post("/artifacts/filter",
                               json={"artifacts": {"key": {"any_": stage_keys}}, "limit": 200}).json()
        assert sorted({a["key"] for a in found}) == sorted(stage_keys), found
