"""The README demo: post-train on the embedded default in Prefect's ephemeral mode (no server), ending with
the exported model answering through transformers and a human summary -- run as a user would, in a fresh
process. Then the same workdir again with ``--resume-from`` the first run: it continues that run (nothing
left to train) and adds no run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_helpers import REPO


def _demo(work: Path, cwd: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no API URL: ephemeral mode
    env["PYTHONPATH"] = str(REPO)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mirotrain", "demo", "--workdir", str(work), *extra], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    return r, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_post_train_demo_ephemeral(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    r, wall = _demo(work, tmp_path)
    result = json.loads((work / "demo_result.json").read_text())
    run = result["run_name"]
    assert result["prefect_home"] == str(work / ".prefect")
    assert result["export_dir"] == str(work / "export" / run)
    assert Path(result["export_dir"], "config.json").is_file()
    assert result["sft"]["output_dir"] == str(work / "runs" / "sft" / run)
    assert result["dpo"]["output_dir"] == str(work / "runs" / "dpo" / run)
    assert isinstance(result["reply"], str) and result["reply"].strip()
    assert result["sft"]["steps"] == 20 and result["dpo"]["steps"] == 12  # the demo's step caps (pipelines/demo.py)
    for stage in ("sft", "dpo"):
        assert isinstance(result[stage]["final_loss"], float) and result[stage]["resumed_from"] is None
    # The human summary: the gibberish warning (also up front), what ran, the losses, where the outputs are.
    assert r.stdout.count("gibberish") == 2, r.stdout[-3000:]
    tail = r.stdout[r.stdout.index(f"Demo run {run} finished"):]
    for text in ("Losses:  SFT", "DPO", result["export_dir"], result["sft"]["output_dir"], result["reply"]):
        assert text in tail, (text, tail)
    assert wall < 600, f"demo took {wall:.0f}s"
    print(f"demo wall time {wall:.0f}s\n{tail}")

    r2, wall2 = _demo(work, tmp_path, "--resume-from", run)
    again = json.loads((work / "demo_result.json").read_text())
    assert again["run_name"] == run and again["export_dir"] == result["export_dir"]
    for stage in ("sft", "dpo"):
        assert again[stage]["steps"] == result[stage]["steps"]
        assert again[stage]["final_loss"] == result[stage]["final_loss"]
        assert [p.name for p in (work / "runs" / stage).iterdir()] == [run]
    print(f"resumed demo wall time {wall2:.0f}s")
