"""`mirotrain validate` on every shipped config, and its failures on broken ones."""

from pathlib import Path

import pytest

from mirotrain.commands.validate import main as validate

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs"
SHIPPED = sorted(CONFIG_ROOT.rglob("*.yaml"))


def test_configs_are_shipped():
    names = {p.relative_to(CONFIG_ROOT).as_posix() for p in SHIPPED}
    for expected in ["qwen3/8B_full_sft.yaml", "qwen3/32B_full_sft.yaml", "qwen3/8B_full_dpo.yaml",
                     "tiny/sft.yaml", "tiny/dpo.yaml"]:
        assert expected in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIG_ROOT).as_posix())
def test_validate_passes_on_shipped_config(path, capsys):
    # Shipped recipes point at /models/... paths that do not exist on a CI machine: skip the file check.
    world = 8 if "tiny" not in path.parts else 1
    assert validate(["--config", str(path), "--world-size", str(world), "--no-file-check"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "parameters" in out and "config is valid" in out


def test_validate_reports_checkpoint_disk_and_host_memory(capsys):
    """Qwen3-32B on one 8-GPU node: 12 bytes per parameter on disk; for async saves, per node, the ranks'
    shards of those tensors (FSDP pads dim 0 to the world size: ~366 GiB)."""
    path = CONFIG_ROOT / "qwen3" / "32B_full_sft.yaml"
    assert validate(["--config", str(path), "--world-size", "8", "--no-file-check", "auto_resume=True"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("checkpoints:"))
    assert "~366 GiB each on disk (keep 2: up to ~1098 GiB while the next one is written)" in line
    assert "~366 GiB of host memory per node of 8 GPUs" in line


@pytest.mark.parametrize("override,message", [
    ("gradient_accumulation_step=2", "unknown key; did you mean 'gradient_accumulation_steps'?"),
    ("epochs=three", "config key 'epochs': expected int, got str"),
    ("checkpointer.checkpoint_dir=/nonexistent/qwen3", "config key 'checkpointer.checkpoint_dir': path does not exist"),
    ("dataset.streaming_pack=True", "mutually exclusive"),
    ("mfu_peak_tflops=fast", "config key 'mfu_peak_tflops': expected"),
])
def test_validate_fails_with_expected_message(override, message, capsys):
    path = CONFIG_ROOT / "qwen3" / "8B_full_sft.yaml"
    args = ["--config", str(path), "--world-size", "8", override, "dataset.packed=True"]
    if "checkpoint_dir" not in override:
        args.insert(4, "--no-file-check")
    assert validate(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any(message in line for line in lines), lines
    assert all(line.startswith(f"mirotrain validate: {path}: config key '") for line in lines), lines


def test_configured_mfu_peak_is_used(monkeypatch):
    import torch

    from mirotrain.training.metrics import peak_flops

    monkeypatch.delenv("MIROTRAIN_PEAK_TFLOPS", raising=False)
    assert validate(["--config", str(CONFIG_ROOT / "tiny" / "sft.yaml"), "--no-file-check", "mfu_peak_tflops=500"]) == 0
    assert peak_flops(torch.device("cpu"), torch.bfloat16, 500) == 500e12
    assert peak_flops(torch.device("cpu"), torch.bfloat16, None) is None


def test_validate_warns_when_the_memory_estimate_exceeds_the_gpu(capsys):
    """Qwen3-32B on 8× 80 GB: SP=1 (~80 GiB/GPU) would run out of memory; the shipped SP=4 (~68) fits."""
    path = str(CONFIG_ROOT / "qwen3" / "32B_full_sft.yaml")
    assert validate(["--config", path, "--world-size", "8", "--no-file-check", "ulysses_sequence_parallel_size=1"]) == 0
    assert "warning:     that is above 90% of a 79.2 GiB GPU" in capsys.readouterr().out
    assert validate(["--config", path, "--world-size", "8", "--no-file-check"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert validate(["--config", path, "--world-size", "8", "--no-file-check", "--gpu-memory-gib", "70"]) == 0
    assert "warning:     that is above 90% of a 70 GiB GPU" in capsys.readouterr().out
