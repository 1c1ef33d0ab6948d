"""train / reference_logprobs / convert_checkpoint / report_run on the real engine (tiny Qwen3, CPU, fp32):
fault injection -> task retry -> resume -> the same final weights as an uninterrupted run; cancellation
leaves no torchrun process; every task CLI runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow

from pipeline_helpers import REPO, processes_mentioning, tiny_stage_overrides
from tasks.train import TrainResult, train

STEPS = ["max_steps_per_epoch=6", "epochs=1", "checkpoint_steps_for_auto_resume=2"]


@flow(name="test-train")
def _train_flow(config: str, overrides: list[str], env: dict[str, str] | None, retries: int):
    return train.with_options(retries=retries, retry_delay_seconds=0)("sft", config, overrides, nproc_per_node=1,
                                                                      env=env, return_state=True)


def _final_weights(out_dir: str) -> dict:
    from safetensors.torch import load_file

    hf = Path(out_dir) / "hf" / "final"
    tensors = {}
    for f in sorted(hf.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no safetensors in {hf}"
    return tensors


@pytest.mark.timeout(1200)
def test_fault_retry_resume_equals_uninterrupted(prefect_api: str, demo_inputs: dict, tmp_path: Path) -> None:
    import torch

    config, base = tiny_stage_overrides(demo_inputs, "sft", tmp_path, STEPS)
    clean = _train_flow(config, base + [f"output_dir={tmp_path / 'clean'}"], None, 0)
    assert clean.name == "Completed", clean.message
    marker = tmp_path / "fault.marker"
    env = {"MIROTRAIN_FAULT_AFTER_STEP": "3", "MIROTRAIN_FAULT_MARKER": str(marker)}
    faulted = _train_flow(config, base + [f"output_dir={tmp_path / 'faulted'}"], env, 1)
    assert faulted.name == "Completed", faulted.message
    assert marker.exists(), "the fault hook never fired"
    result: TrainResult = faulted.result()
    # The retry resumed rather than restarting: it started from a step checkpoint written before the fault.
    assert result.resumed_from and Path(result.resumed_from).name in ("step_2", "step_3"), result.resumed_from
    a, b = _final_weights(clean.result().output_dir), _final_weights(result.output_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.timeout(600)
def test_cancel_running_train_leaves_no_torchrun(api_env: dict, demo_inputs: dict, tmp_path: Path) -> None:
    """SIGTERM to the flow process is how a worker cancels a run; the task must take torchrun and both ranks down."""
    out = tmp_path / "cancelled-run"
    config, overrides = tiny_stage_overrides(demo_inputs, "sft", tmp_path, ["epochs=50", f"output_dir={out}"])
    cmd = [sys.executable, "-m", "tasks.train", "--recipe", "sft", "--config", config, "--launcher", "torchrun",
           "--nproc-per-node", "2", "--master-port", "29731", "--overrides", *overrides]
    proc = subprocess.Popen(cmd, env=api_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 400
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "step 2" in line.lower() or "step=2" in line.lower():
                break
            assert time.monotonic() < deadline, "training never reached step 2"
        assert processes_mentioning("torch.distributed.run") and len(processes_mentioning(str(out))) >= 3
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and processes_mentioning(str(out)):
        time.sleep(0.5)
    assert processes_mentioning(str(out)) == [], "".join(seen[-30:])
    assert not [p for p in processes_mentioning("torch.distributed.run") if "29731" in p]


@pytest.mark.timeout(900)
def test_task_clis_train_convert_report_reference(api_env: dict, demo_inputs: dict, tmp_path: Path) -> None:
    """Each task's `python -m tasks.<name>` runs against the Prefect API and does its step."""

    def run(*args: str) -> dict:
        r = subprocess.run([sys.executable, "-m", *args], env=api_env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return json.loads(r.stdout[r.stdout.index("{"):])

    out = tmp_path / "sft"
    config, overrides = tiny_stage_overrides(demo_inputs, "sft", tmp_path, ["max_steps_per_epoch=2", "epochs=1",
                                                                            "checkpoint_steps_for_auto_resume=2"])
    trained = run("tasks.train", "--recipe", "sft", "--config", config, "--output-dir", str(out), "--overrides", *overrides)
    assert trained["output_dir"] == str(out) and trained["checkpoints"]
    converted = run("tasks.convert_checkpoint", "--checkpoint", str(out), "--output", str(tmp_path / "hf"), "--config", config)
    assert (Path(converted["path"]) / "config.json").is_file()
    report = run("tasks.report_run", "--output-dir", str(out), "--key", "sft")
    assert report["metrics_rows"] >= 1 and Path(report["loss_curve_png"]).is_file()
    dpo_config, dpo_overrides = tiny_stage_overrides(demo_inputs, "dpo", tmp_path, [])
    packed = run("tasks.pack_dataset", "--config", dpo_config, "--overrides", *dpo_overrides)
    run_ref = subprocess.run([sys.executable, "-m", "tasks.reference_logprobs", "--config", dpo_config, "--overrides",
                              *dpo_overrides, f"dataset.shard_dir={packed['path']}"], env=api_env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert run_ref.returncode == 0, run_ref.stdout[-3000:] + run_ref.stderr[-3000:]


def test_report_run_plots_and_tables_without_prefect(tmp_path: Path) -> None:
    """report_run's reading and plotting (mirotrain.training.loss_curve) on an engine-shaped metrics file."""
    from mirotrain.training.loss_curve import plot_loss, read_metrics

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 2.0 / i}) for i in range(1, 11)) + "\n{partial")
    rows = read_metrics(tmp_path)
    assert len(rows) == 10
    png = plot_loss(rows, tmp_path / "loss.png", "t")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
