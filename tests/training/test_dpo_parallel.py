"""DPO under torchrun (gloo, 2 processes): the pair normalisation and the SP reduction are layout-free.

* SP=2 (one packed row split over 2 ranks, partial log-prob sums all-reduced) == SP=1, step by step.
* DP=2 x GA=1 == DP=1 x GA=2: the same rows per optimizer step give the same mean-over-pairs loss and
  gradient, although the pairs are split differently between ranks and micro-batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_helpers import REPO, TINY_DPO, tiny_overrides

pytestmark = pytest.mark.slow
KEYS = ("loss", "grad_norm", "pairs", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected")


def _launch(nproc: int, overrides: list[str]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "mirotrain", "dpo"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mirotrain", "dpo"]
    proc = subprocess.run(cmd + ["--config", str(TINY_DPO), *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in KEYS:
            assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])


def test_sequence_parallel_equals_single_rank(preference_data, tmp_path):
    common = ["epochs=1", "max_steps_per_epoch=2", "auto_resume=False"]
    one = _launch(1, tiny_overrides(preference_data, tmp_path / "sp1", *common))
    two = _launch(2, tiny_overrides(preference_data, tmp_path / "sp2", "ulysses_sequence_parallel_size=2", *common))
    _same(one, two)


def test_data_parallel_equals_gradient_accumulation(preference_data, tmp_path):
    common = ["epochs=1", "max_steps_per_epoch=2", "auto_resume=False", "shuffle=False"]
    ga = _launch(1, tiny_overrides(preference_data, tmp_path / "ga2", "gradient_accumulation_steps=2", *common))
    dp = _launch(2, tiny_overrides(preference_data, tmp_path / "dp2", "gradient_accumulation_steps=1", *common))
    _same(ga, dp)
