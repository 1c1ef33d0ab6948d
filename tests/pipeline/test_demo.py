"""The README demo: post-train on the embedded default in Prefect's ephemeral mode (no server), ending with
the exported model answering through transformers -- run as a user would, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_helpers import REPO


@pytest.mark.timeout(900)
def test_post_train_demo_ephemeral(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no API URL: ephemeral mode
    env["PYTHONPATH"] = str(REPO)
    work = tmp_path / "demo"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipelines.demo", "--workdir", str(work)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=840)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    result = json.loads((work / "demo_result.json").read_text())
    assert result["prefect_home"] == str(work / ".prefect")
    assert Path(result["export_dir"], "config.json").is_file()
    assert isinstance(result["reply"], str) and result["reply"].strip()
    assert result["sft"]["steps"] and result["dpo"]["steps"]
    assert wall < 600, f"demo took {wall:.0f}s"
    print(f"demo wall time {wall:.0f}s; reply {result['reply']!r}")
