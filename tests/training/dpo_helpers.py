"""Shared pieces of the DPO engine tests: the tiny CPU config and its overrides (imported as a plain module:
pytest puts this directory on sys.path; the demo preference data fixture lives in this directory's conftest)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_DPO = REPO / "mirotrain" / "configs" / "tiny" / "dpo.yaml"


def tiny_overrides(data: dict[str, str], output_dir: Path, *extra: str) -> list[str]:
    """Overrides of configs/tiny/dpo.yaml for a fast CPU run on ``data['train']``."""
    return [f"output_dir={output_dir}", f"dataset.data_files={data['train']}", f"dataset.output_dir={data['packed']}",
            "metric_logger=null", *extra]
