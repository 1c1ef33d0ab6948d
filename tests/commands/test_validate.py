"""`mirotrain validate`'s plan: the host memory of step checkpoints on tmpfs, and the per-GPU memory estimate."""

from pathlib import Path

import pytest

from mirotrain.checkpoint.host_memory import filesystem_type
from mirotrain.commands.validate import main as validate

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs"
QWEN3_32B_SFT = str(CONFIG_ROOT / "qwen3" / "32B_full_sft.yaml")


def _lines(capsys, *args: str) -> list[str]:
    assert validate(["--config", QWEN3_32B_SFT, "--world-size", "8", "--no-file-check", "auto_resume=True", *args]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.skipif(filesystem_type("/dev/shm") != "tmpfs", reason="/dev/shm is not a tmpfs here")
def test_checkpoints_on_tmpfs_count_as_host_memory(capsys):
    """Qwen3-32B on one 8-GPU node, output_dir in /dev/shm: 3 × 366 GiB of files (keep 2 + the one being
    written) plus 366 GiB of staging; no host of this size holds the files, so training would stop."""
    lines = _lines(capsys, "output_dir=/dev/shm/mirotrain-validate-test/run")
    memory = next(row for row in lines if row.startswith("host memory:"))
    assert memory.startswith("host memory: /dev/shm/mirotrain-validate-test/run is on tmpfs: its checkpoints take "
                             "~1098 GiB of host memory per node + ~366 GiB of async staging = ~1465 GiB")
    warning = next(row for row in lines if row.startswith("warning:"))
    assert "training would stop at its first save: step checkpoints in /dev/shm/mirotrain-validate-test/run/" \
           "checkpoints (tmpfs: files held in host memory) would take ~1098 GiB" in warning
    assert not Path("/dev/shm/mirotrain-validate-test").exists()  # validate creates nothing


def test_checkpoints_on_disk_add_no_host_memory_line(capsys, tmp_path):
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the test's temporary directory is on tmpfs here")
    lines = _lines(capsys, f"output_dir={tmp_path}/run")
    assert not any(row.startswith(("host memory:", "warning:")) for row in lines)
