"""The train task from a working directory that holds a folder named ``mirotrain/`` (as ``/tmp`` does once a
shipped config has written its ``output_dir``, ``/tmp/mirotrain/...``).

With the editable install (``pip install -e .``) the package is found by an import hook that runs after
Python's path search, so in such a directory ``python -m ...`` (the working directory first on ``sys.path``)
imports ``mirotrain`` as an empty namespace package: its ``__file__`` is None. The task, and the torchrun
workers it starts there, must still run the installed engine. Run as a user would: no PYTHONPATH, no Prefect
API (``--no-prefect``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import tiny_stage_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_task_runs_from_a_directory_holding_a_mirotrain_folder(demo_inputs: dict, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    (cwd / "mirotrain").mkdir(parents=True)
    out = tmp_path / "run"
    config, overrides = tiny_stage_overrides(demo_inputs, "sft", tmp_path, ["max_steps_per_epoch=2", "epochs=1"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PREFECT_")}
    cmd = [sys.executable, "-m", "tasks.train", "--no-prefect", "--recipe", "sft", "--config", config,
           "--output-dir", str(out), "--launcher", "torchrun", "--nproc-per-node", "1",
           "--master-port", str(_free_port()), "--overrides", *overrides]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["output_dir"] == str(out) and result["steps"] == 2
    assert list((cwd / "mirotrain").iterdir()) == []  # nothing was written into the user's folder
