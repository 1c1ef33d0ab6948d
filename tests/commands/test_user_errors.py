"""User errors through the `mirotrain` command line: exit code 2 and one line naming the key or the file.

Each case runs the real command in process (``mirotrain.cli.main``), as the README shows it; ``--debug``
turns the line back into the exception with its traceback. The torchrun case checks that every rank exits 2
and only rank 0 prints.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mirotrain.cli import main
from mirotrain.config import ConfigError
from mirotrain.data.demo import write_demo

REPO = Path(__file__).resolve().parents[2]
TINY_SFT = str(REPO / "mirotrain" / "configs" / "tiny" / "sft.yaml")
TINY_DPO = str(REPO / "mirotrain" / "configs" / "tiny" / "dpo.yaml")
QWEN3_8B = REPO / "mirotrain" / "configs" / "qwen3" / "8B_full_sft.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(capsys: pytest.CaptureFixture[str], prog: str) -> list[str]:
    """The command's own stderr lines, after checking that no traceback was printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"{prog}: ")]


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """Each in-process run logs to the stderr of its own test (the trainer adds its handler once per process)."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_mirotrain", False)]:
        root.removeHandler(handler)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_demo(str(tmp_path_factory.mktemp("demo-data")), 8, 0, 8)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=abc", "config key 'optimizer.lr': expected int or float, got str ('abc')"),
    ("dataset.packed_seq_lenn=2048", "config key 'dataset.packed_seq_lenn': unknown key; did you mean 'packed_seq_len'?"),
    ("lr_scheduler.warmup_ratio=2", "config key 'lr_scheduler.warmup_ratio': must be <= 1, got 2"),
    ("batch_size=abc", "config key 'batch_size': expected int, got str ('abc')"),
    ("tokenizer.max_seq_lenn=512", "config key 'tokenizer.max_seq_lenn': unknown key; did you mean 'max_seq_len'?"),
    ("epochs=0", "config key 'epochs': must be >= 1, got 0"),
    ("device=tpu", "config key 'device': must be one of cuda, cpu, got 'tpu'"),
    ("compile={model: true, bogus: 1}", "config key 'compile': unknown keys ['bogus'] (known: loss, model, "
                                        "optimizer_step, scale_grads)"),
])
def test_validate_refuses_with_the_key_path(override, message, capsys):
    assert main(["validate", "--config", TINY_SFT, "--no-file-check", override]) == 2
    assert error_lines(capsys, "mirotrain validate") == [f"mirotrain validate: {TINY_SFT}: {message}"]


def test_debug_raises_the_error_with_its_traceback():
    with pytest.raises(ConfigError, match="optimizer.lr"):
        main(["validate", "--config", TINY_SFT, "--no-file-check", "optimizer.lr=abc", "--debug"])


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert error_lines(capsys, "mirotrain sft") == [f"mirotrain sft: config file not found: {tmp_path / 'nope.yaml'}"]


def test_pack_checks_the_config_first(capsys):
    """The README's 8B example without its model directory: the tokenizer path, not a transformers traceback."""
    path = "/nonexistent/Qwen3-8B"
    assert main(["pack", "--config", str(QWEN3_8B), f"tokenizer.path={path}"]) == 2
    assert error_lines(capsys, "mirotrain pack") == [
        f"mirotrain pack: {QWEN3_8B}: config key 'tokenizer.path': path does not exist: {path}"]


@pytest.mark.parametrize("override, message", [
    ("dataset.packed_seq_lenn=2048", "config key 'dataset.packed_seq_lenn': unknown key; did you mean 'packed_seq_len'?"),
    ("gradient_accumulation_step=2", "config key 'gradient_accumulation_step': unknown key; did you mean "
                                     "'gradient_accumulation_steps'?"),
])
def test_pack_refuses_an_unknown_key(tmp_path, demo_data, override, message, capsys):
    args = ["pack", "--config", TINY_SFT, f"output_dir={tmp_path}", f"dataset.data_files={demo_data['sft']}", override]
    assert main(args) == 2
    assert error_lines(capsys, "mirotrain pack") == [f"mirotrain pack: {TINY_SFT}: {message}"]


def test_pack_reports_malformed_data_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    assert main(["pack", "--config", TINY_SFT, f"output_dir={tmp_path}", f"dataset.data_files={bad}"]) == 2
    [line] = error_lines(capsys, "mirotrain pack")
    assert line.startswith(f"mirotrain pack: {bad}:1: malformed JSON")


@pytest.mark.parametrize("command, config, override, message", [
    ("sft", TINY_SFT, "lr_scheduler.warmup_ratio=-0.1", "config key 'lr_scheduler.warmup_ratio': must be >= 0, got -0.1"),
    ("sft", TINY_SFT, "lr_scheduler.min_lr_ratio=1.5", "config key 'lr_scheduler.min_lr_ratio': must be <= 1, got 1.5"),
    ("dpo", TINY_DPO, "optimizer.lr=0", "config key 'optimizer.lr': must be > 0, got 0"),
    ("dpo", TINY_DPO, "dataset.packed_seq_len=100", "config key 'dataset.packed_seq_len': (100) must be >= tokenizer.max_seq_len (256)"),
])
def test_recipes_check_the_config_before_any_work(tmp_path, demo_data, command, config, override, message, capsys):
    data = demo_data["sft" if command == "sft" else "preference"]
    args = [command, "--config", config, f"output_dir={tmp_path}", f"dataset.data_files={data}", override]
    assert main(args) == 2
    assert error_lines(capsys, f"mirotrain {command}") == [f"mirotrain {command}: {config}: {message}"]
    assert not (tmp_path / "logs").exists()  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_names_the_device_key(tmp_path, demo_data, capsys):
    args = ["sft", "--config", TINY_SFT, f"output_dir={tmp_path}", f"dataset.data_files={demo_data['sft']}", "device=cuda"]
    assert main(args) == 2
    assert error_lines(capsys, "mirotrain sft") == [
        "mirotrain sft: config key 'device': cuda, but this machine has no CUDA device; set device=cpu to train on CPU"]


@pytest.mark.parametrize("command, config, content, message", [
    ("sft", TINY_SFT, '{"messages": [}\n', ":1: malformed JSON"),
    ("sft", TINY_SFT, "", ": no usable samples"),
    ("dpo", TINY_DPO, '{"prompt": "hi"}\n', ":1: "),
])
def test_recipes_report_bad_data_as_one_line(tmp_path, command, config, content, message, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    assert main([command, "--config", config, f"output_dir={tmp_path / 'run'}", f"dataset.data_files={data}"]) == 2
    [line] = error_lines(capsys, f"mirotrain {command}")
    assert line.startswith(f"mirotrain {command}: {data}{message}"), line


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_under_torchrun_every_rank_exits_2_and_only_rank_0_prints(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "mirotrain", "sft", "--config", TINY_SFT,
                           f"output_dir={tmp_path / 'run'}", f"dataset.data_files={bad}"],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=540)
    assert proc.returncode != 0
    exits = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)  # torchrun's failure summary, one per rank
    assert len(exits) >= 2 and set(exits) == {"2"}, proc.stderr[-3000:]
    assert "[rank0]:" not in proc.stderr and "[rank1]:" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mirotrain sft: ")]
    assert lines == [f"mirotrain sft: {bad}:1: malformed JSON line: Expecting value at column 15"], proc.stderr[-3000:]
