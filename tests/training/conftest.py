"""Fixtures of the training tests: demo preference data for the DPO runs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory) -> dict[str, str]:
    """A small training set and a held-out set of demo preference pairs (different seeds)."""
    from mirotrain.data.demo import write_demo

    root = tmp_path_factory.mktemp("dpo-data")
    train = write_demo(str(root / "train"), num_samples=1, seed=0, num_pairs=40)["preference"]
    heldout = write_demo(str(root / "heldout"), num_samples=1, seed=1, num_pairs=40)["preference"]
    return {"train": train, "heldout": heldout, "packed": str(root / "packed")}
