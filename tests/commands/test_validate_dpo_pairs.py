"""`mirotrain validate` on a DPO config: how many pairs an optimizer step trains, and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirotrain.commands.validate import main as validate
from mirotrain.config import load_config
from mirotrain.config.tree import TrainConfig
from mirotrain.data.demo import write_demo
from mirotrain.data.pack_shards import pack_dataset
from mirotrain.data.preference import DPOShardReader

TINY_DPO = str(Path(__file__).resolve().parents[2] / "mirotrain" / "configs" / "tiny" / "dpo.yaml")


@pytest.fixture
def overrides(tmp_path) -> list[str]:
    pairs = write_demo(str(tmp_path / "data"), num_samples=1, seed=0, num_pairs=50)["preference"]
    return [f"output_dir={tmp_path / 'run'}", f"dataset.data_files={pairs}", "gradient_accumulation_steps=3"]


def _pairs_lines(capsys, overrides: list[str]) -> list[str]:
    assert validate(["--config", TINY_DPO, "--world-size", "2", *overrides]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("pairs/step:", "notice:",
                                                                                       "warning:"))]


def test_pairs_per_row_are_measured_once_packed(capsys, overrides):
    """Before packing: not known, and the pack command that makes them known; after: the manifest's figures."""
    step, notice = _pairs_lines(capsys, overrides)
    assert step.startswith("pairs/step:  not yet known: 6 rows (batch_size 1 × gradient_accumulation_steps 3 × "
                           "data-parallel 2), each holding as many pairs as fit in 512 tokens; the pairs are not "
                           f"packed yet: `mirotrain pack --config {TINY_DPO} {' '.join(overrides)}` packs them")
    assert notice.startswith("notice:      batch_size counts packed rows, not pairs; one_pair_per_row: true packs one "
                             "pair per row, so a step trains exactly 6 pairs")

    shard_dir = pack_dataset(TrainConfig.from_dict(load_config(TINY_DPO, overrides)))
    reader = DPOShardReader(shard_dir)
    per_row = [len(reader.pair_row(i)["pair_ids"]) for i in range(len(reader))]
    mean = 50 / len(per_row)
    step, notice = _pairs_lines(capsys, overrides)
    assert step == (f"pairs/step:  ~{6 * mean:,.0f} = 6 rows (batch_size 1 × gradient_accumulation_steps 3 × "
                    f"data-parallel 2) × {mean:.2f} pairs per row (measured in {shard_dir}: 50 pairs in "
                    f"{len(per_row)} rows, {min(per_row)} to {max(per_row)} per row)")
    assert mean > 1 and notice.startswith("notice:      batch_size counts packed rows")

    # the option cannot re-pack shards it is pointed at: said, not silently ignored
    step, warning = _pairs_lines(capsys, [*overrides, "one_pair_per_row=true", f"dataset.shard_dir={shard_dir}"])
    assert step.startswith("pairs/step:  ~") and f"measured in {shard_dir}: 50 pairs" in step
    assert warning.startswith(f"warning:     one_pair_per_row applies when pairs are packed, but shard_dir {shard_dir} "
                              "was packed with several pairs per row")


def test_one_pair_per_row_trains_batch_size_x_ga_x_dp_pairs(capsys, overrides):
    (step,) = _pairs_lines(capsys, [*overrides, "one_pair_per_row=true"])
    assert step == ("pairs/step:  6 = batch_size 1 × gradient_accumulation_steps 3 × data-parallel 2: one pair per "
                    "row (one_pair_per_row), as MiroTrain counted them")
