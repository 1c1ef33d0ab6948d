"""What a finished run leaves behind, and what re-running or converting it does (`mirotrain sft`, one CPU process).

The run has 7 steps and checkpoints every 5, so its last step is not on the interval: the trainer must still
checkpoint step 7. A re-run of the same output_dir with auto_resume resumes there, trains 0 steps and keeps
summary.json truthful; `mirotrain convert` of the run directory exports exactly the run's final weights. Both
commands run under umask 077, and their HF exports must still be readable by other users (0644 / 0755).
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_helpers import REPO, assert_ok, read_weights, run_sft, tiny_config, write_config, write_shards  # noqa: E402

STEPS, EVERY = 7, 5


def _umask_077(fn, *args, **kwargs):
    """Run ``fn`` with the process umask 077 (inherited by the subprocesses it starts)."""
    old = os.umask(0o077)
    try:
        return fn(*args, **kwargs)
    finally:
        os.umask(old)


def _metric_lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run, then the same command again (the no-op re-run); what each left behind."""
    tmp = tmp_path_factory.mktemp("finished")
    shards = write_shards(tmp / "shards", n_rows=STEPS, seq_len=64, seed=5)
    out = tmp / "run"
    config = write_config(tiny_config(out, shards, auto_resume=True, checkpoint_steps_for_auto_resume=EVERY,
                                      keep_last_n_checkpoints=2), tmp / "run.yaml")
    first = _umask_077(run_sft, config)
    assert_ok(first)
    before = {"summary": json.loads((out / "summary.json").read_text()), "metrics": _metric_lines(out),
              "weights": read_weights(out / "hf" / "final"),
              "checkpoints": sorted(d.name for d in (out / "checkpoints").iterdir())}
    again = _umask_077(run_sft, config)
    assert_ok(again)
    return {"tmp": tmp, "out": out, "before": before, "rerun_log": again.stdout + again.stderr}


@pytest.mark.slow
def test_finished_run_checkpoints_its_last_step_and_a_rerun_trains_nothing(finished):
    out, before = finished["out"], finished["before"]
    assert before["checkpoints"] == [f"step_{EVERY}", f"step_{STEPS}"]
    assert (out / "checkpoints" / f"step_{STEPS}" / "COMPLETE").is_file()
    log = finished["rerun_log"]
    assert f"step_{STEPS}: step {STEPS}" in log, log[-3000:]
    assert f"already trained all {STEPS} steps" in log
    assert "Step 1 |" not in log and f"Step {STEPS} |" not in log  # no step was trained again
    assert _metric_lines(out) == before["metrics"]
    after = read_weights(out / "hf" / "final")
    assert after.keys() == before["weights"].keys()
    assert all(torch.equal(after[k], before["weights"][k]) for k in after)


@pytest.mark.slow
def test_rerun_keeps_the_summary_truthful(finished):
    out, first = finished["out"], finished["before"]["summary"]
    rows = [json.loads(line) for line in finished["before"]["metrics"]]
    assert first["steps"] == STEPS and first["steps_trained"] == STEPS and first["resumed_from_step"] is None
    assert first["first_loss"] == rows[0]["loss"] and first["final_loss"] == rows[-1]["loss"]
    again = json.loads((out / "summary.json").read_text())
    for key in ("steps", "first_loss", "final_loss", "hf_dir", "trained_tokens", "last_metrics", "loss_curve_png"):
        assert again[key] == first[key] and again[key] is not None, key
    assert again["steps_trained"] == 0 and again["resumed_from_step"] == STEPS


@pytest.mark.slow
def test_training_writes_the_loss_curve(finished):
    png = finished["out"] / "loss_curve.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert finished["before"]["summary"]["loss_curve_png"] == str(png)


def _assert_public(root: Path) -> None:
    """Every directory under (and including) ``root`` is 0755 and every file 0644."""
    paths = [root, *root.rglob("*")]
    assert any(p.is_file() for p in paths)
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {oct(mode)}"


@pytest.mark.slow
def test_in_training_export_is_readable_by_other_users(finished):
    out = finished["out"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    _assert_public(out / "hf")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "hf" / "final").iterdir()}


def _convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mirotrain", "convert", *args], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_convert_of_the_run_directory_exports_the_final_weights(finished):
    out, tmp = finished["out"], finished["tmp"]
    export = tmp / "exports" / "nested" / "hf"
    p = _umask_077(_convert, "--checkpoint", str(out), "--output", str(export), "--max-shard-size", "40KB")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"step_{STEPS}" in p.stderr and "newest complete step checkpoint" in p.stderr
    converted, final = read_weights(export), read_weights(out / "hf" / "final")
    assert converted.keys() == final.keys()
    for key in final:
        assert torch.equal(converted[key], final[key]), key
    # several shards, an index, config and tokenizer files; every one of them and the created parents public
    assert len(list(export.glob("model-*-of-*.safetensors"))) > 1
    assert (export / "model.safetensors.index.json").is_file()
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    _assert_public(tmp / "exports")


@pytest.mark.slow
def test_convert_refuses_bad_arguments_with_exit_2(tmp_path):
    missing = tmp_path / "nonexistent"
    p = _convert("--checkpoint", str(missing), "--output", str(tmp_path / "hf"))
    assert p.returncode == 2
    assert p.stderr.strip() == f"mirotrain convert: checkpoint directory {missing} does not exist"
    p = _convert("--checkpoint", str(tmp_path), "--output", str(tmp_path / "hf"))
    assert p.returncode == 2 and "neither a step checkpoint" in p.stderr
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)  # a save that never finished
    p = _convert("--checkpoint", str(tmp_path), "--output", str(tmp_path / "hf"))
    assert p.returncode == 2 and "holds no complete step checkpoint" in p.stderr
    p = _convert("--checkpoint", str(tmp_path), "--output", str(tmp_path / "hf"), "--max-shard-size", "lots")
    assert p.returncode == 2 and "--max-shard-size" in p.stderr
    assert not (tmp_path / "hf").exists()
