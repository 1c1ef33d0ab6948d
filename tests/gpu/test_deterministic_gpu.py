"""Deterministic mode on 2 GPUs (#20): Qwen3-0.6B shapes, bf16 compute with fp32 master weights, compiled decoder
layers, FSDP2 over 2 ranks, 30 steps of 8K-token packed rows of the demo traces (configured as
benchmarks/bf16_mode.py configures its runs).

With ``cudnn_deterministic_mode: true``: two runs give bitwise-equal losses, grad norms, LRs, bf16 HF exports
and fp32 master weights; a third run, SIGKILLed after step 22 (its step-20 checkpoint complete) and
restarted, equals them too. The first run compiles into an empty Inductor cache and the others load its
kernels from it, so cold and cached compilation are compared as well. A fourth run without the mode gives the
step time the mode's cost is quoted against (printed). Five launches, each dominated by start-up, compilation
and (for the resumed run) two 7 GB step checkpoints: about 4-5 minutes on 2x H200:

    python3 -m pytest -p no:cacheprovider tests/gpu/test_deterministic_gpu.py -m gpu -o addopts="" -q -s
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "deterministic_worker.py"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "training"))

NPROC, SEQ, STEPS = 2, 8192, 30
EVERY, KILL_AFTER = 20, 22  # step checkpoints at 20 and 30 (the last); killed after 22, so resumed from 20
TIMED_FROM = 6  # earlier steps compile and warm up: left out of the step time


def _launch(work: Path, name: str, cfg: dict, env: dict | None = None, digests: bool = True
            ) -> subprocess.CompletedProcess:
    """One run of ``cfg`` under torchrun into ``work/name``, its weight digests (``digests``) into
    ``work/name.digests.json``; its own session, so the fault hook's process-group kill never reaches pytest."""
    config = work / f"{name}.json"
    config.write_text(json.dumps({**cfg, "output_dir": str(work / name)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
           str(WORKER), str(config)] + ([str(work / f"{name}.digests.json")] if digests else [])
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the wheels' dir
    full_env = {**os.environ, "PYTHONPATH": python_path, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
                **(env or {})}
    proc = subprocess.run(cmd, env=full_env, cwd=str(REPO), capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    print(f"--- {name}: exit {proc.returncode}", flush=True)
    return proc


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _step_time(out: Path) -> float:
    """Median seconds per step from step ``TIMED_FROM`` on (one row of ``SEQ`` tokens per GPU per step)."""
    from sft_helpers import read_metrics

    rates = [m["tokens_per_sec_per_gpu"] for step, m in read_metrics(out).items() if step >= TIMED_FROM]
    return SEQ / statistics.median(rates)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_deterministic_mode_is_bitwise_reproducible_and_resumable_on_two_gpus(tmp_path):
    from benchmarks.bf16_mode import parse_args, prepare
    from sft_helpers import assert_same_training, read_metrics

    ns = parse_args(["--nproc", str(NPROC), "--seq", str(SEQ), "--steps", str(STEPS), "--init", "fp32"])
    base = prepare(ns, tmp_path)  # demo traces packed into SEQ-token rows; exactly STEPS steps
    deterministic = {**base, "cudnn_deterministic_mode": True}
    first = _launch(tmp_path, "first", deterministic)
    _ok(first)  # an op without a deterministic kernel stops here, naming itself
    second = _launch(tmp_path, "second", deterministic)
    faulted = {**deterministic, "auto_resume": True, "checkpoint_steps_for_auto_resume": EVERY}
    marker = tmp_path / "fault.marker"
    killed = _launch(tmp_path, "resumed", faulted, {"MIROTRAIN_FAULT_AFTER_STEP": str(KILL_AFTER),
                                                    "MIROTRAIN_FAULT_MARKER": str(marker)})
    resumed = _launch(tmp_path, "resumed", faulted)
    default = _launch(tmp_path, "default", base, digests=False)  # for its step time
    for proc in (second, resumed, default):
        _ok(proc)
    assert killed.returncode != 0 and marker.exists(), killed.stderr[-3000:]
    assert f"step_{EVERY}: step {EVERY}" in resumed.stdout + resumed.stderr

    times = {name: _step_time(tmp_path / name) for name in ("first", "second", "default")}
    mode = statistics.mean([times["first"], times["second"]])
    losses = {name: read_metrics(tmp_path / name) for name in ("first", "default")}
    gap = max(abs(losses["first"][s]["loss"] - losses["default"][s]["loss"]) for s in losses["first"])
    print(f"step time ({SEQ} tokens/GPU, median of steps {TIMED_FROM}-{STEPS}): deterministic mode "
          f"{times['first']:.3f} s / {times['second']:.3f} s, without it {times['default']:.3f} s: "
          f"{mode / times['default']:.2f}x ({100 * (mode / times['default'] - 1):+.1f}%); "
          f"largest loss difference to the run without the mode {gap:.2e}", flush=True)

    digests = {name: json.loads((tmp_path / f"{name}.digests.json").read_text())
               for name in ("first", "second", "resumed")}
    for name in ("second", "resumed"):
        assert_same_training(tmp_path / "first", tmp_path / name, STEPS)
        differing = sorted(k for k in digests["first"] if digests[name].get(k) != digests["first"][k])
        assert digests[name].keys() == digests["first"].keys() and not differing, (name, differing[:5])
