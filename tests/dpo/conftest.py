"""Shared pieces of the DPO engine tests: demo preference data and the tiny CPU config."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_DPO = REPO / "mirotrain" / "configs" / "tiny" / "dpo.yaml"


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory) -> dict[str, str]:
    """A small training set and a held-out set of demo preference pairs (different seeds)."""
    from mirotrain.data.demo import write_demo

    root = tmp_path_factory.mktemp("dpo-data")
    train = write_demo(str(root / "train"), num_samples=1, seed=0, num_pairs=40)["preference"]
    heldout = write_demo(str(root / "heldout"), num_samples=1, seed=1, num_pairs=40)["preference"]
    return {"train": train, "heldout": heldout, "packed": str(root / "packed")}


def tiny_overrides(data: dict[str, str], output_dir: Path, *extra: str) -> list[str]:
    """Overrides of configs/tiny/dpo.yaml for a fast CPU run on ``data['train']``."""
    return [f"output_dir={output_dir}", f"dataset.data_files={data['train']}", f"dataset.output_dir={data['packed']}",
            "metric_logger=null", *extra]
