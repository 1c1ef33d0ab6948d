"""HFDirWriter replaces an export so that a complete one is always left: the previous export survives a
failure of the final rename, and a process that dies between the two renames leaves it aside, where the next
writer puts it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mirotrain.models.hf_writer import HFDirWriter

REPO = Path(__file__).resolve().parents[2]


def _export(out: Path, version: int) -> None:
    writer = HFDirWriter(out)
    writer.add("w", torch.full((4,), float(version)))
    writer.finish({"version": version}, tokenizer_dir=None)


def _version(out: Path) -> int:
    """The export's version, after checking that it is complete (config and weights agree)."""
    version = json.loads((out / "config.json").read_text())["version"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.full((4,), float(version)))
    return version


def test_failed_final_rename_leaves_the_previous_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "hf"
    _export(out, 1)
    real_rename = Path.rename

    def failing_rename(self: Path, target: Path) -> Path:
        if self.name == "hf.tmp":
            raise OSError("disk went away")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk went away"):
        _export(out, 2)
    assert _version(out) == 1 and not (tmp_path / "hf.old").exists()


@pytest.mark.slow  # a child process dies between the two renames
def test_death_between_the_renames_leaves_the_previous_export_for_the_next_writer(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    _export(out, 1)
    child = textwrap.dedent(f"""
        import os
        from pathlib import Path
        import torch
        from mirotrain.models.hf_writer import HFDirWriter

        real_rename = Path.rename
        def rename(self, target):
            if self.name == "hf.tmp":
                os._exit(9)  # dies after the previous export was moved aside, before the new one is in
            return real_rename(self, target)
        Path.rename = rename
        writer = HFDirWriter({str(out)!r})
        writer.add("w", torch.full((4,), 2.0))
        writer.finish({{"version": 2}}, tokenizer_dir=None)
    """)
    died = subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr
    assert not out.exists() and _version(tmp_path / "hf.old") == 1
    writer = HFDirWriter(out)  # the next export puts the previous one back before it starts
    assert _version(out) == 1
    writer.add("w", torch.full((4,), 3.0))
    writer.finish({"version": 3}, tokenizer_dir=None)
    assert _version(out) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
