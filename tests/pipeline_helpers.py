"""Helpers shared by the pipeline tests (a uniquely named module: ``conftest`` names clash across test dirs)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_stage_overrides(demo_inputs: dict, recipe: str, workdir: Path, extra: list[str] = ()) -> tuple[str, list[str]]:
    """(config, overrides) for a tiny SFT or DPO run in ``workdir``, exactly as the demo flow builds them."""
    from pipelines.demo import demo_parameters
    from pipelines.params import StageConfig, stage_overrides

    params = demo_parameters(workdir, demo_inputs)
    stage = StageConfig(**params["sft_stage" if recipe == "sft" else "dpo_stage"])
    return stage.config, stage_overrides(stage, demo_inputs["model_dir"]) + list(extra)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes whose arguments contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{entry.name}: {cmd}")
    return found
