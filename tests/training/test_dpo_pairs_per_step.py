"""One DPO optimizer step trains batch_size × GA × data-parallel pairs with one_pair_per_row, as MiroTrain's
batch_size meant, through the whole recipe (pack, reference pass, training)."""

from __future__ import annotations

import json

import pytest

from mirotrain.config import load_config
from mirotrain.training.distributed import destroy_distributed
from mirotrain.training.dpo import run_dpo
from dpo_helpers import TINY_DPO, tiny_overrides

pytestmark = pytest.mark.slow  # the DPO recipe end to end in this process, as tests/training/test_dpo_training.py


@pytest.mark.parametrize("one_pair_per_row,pairs_per_step", [(True, [3, 3]), (False, None)])
def test_logged_pairs_per_step(preference_data, tmp_path, one_pair_per_row, pairs_per_step):
    out = tmp_path / "run"
    overrides = tiny_overrides(dict(preference_data, packed=str(tmp_path / "packed")), out, "epochs=1",
                               "max_steps_per_epoch=2", "auto_resume=False", "gradient_accumulation_steps=3",
                               f"one_pair_per_row={one_pair_per_row}")
    try:
        summary = run_dpo(load_config(TINY_DPO, overrides))
    finally:
        destroy_distributed()
    assert summary["steps"] == 2
    logged = [json.loads(line)["pairs"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    if pairs_per_step is not None:
        assert logged == pairs_per_step  # batch_size 1 × GA 3 × 1 data-parallel rank
    else:
        assert min(logged) > 3  # packed rows: several demo pairs per 512-token row
