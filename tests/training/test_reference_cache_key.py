"""The reference log-prob cache's key covers the MLP's tiles (mirotrain/training/reference.py): a tiled run's
log-probs differ from an untiled run's in their last bits, so neither reuses the other's cache; an untiled run
(``mlp_tiles: auto`` is 1 on CPU) finds the cache it always found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mirotrain.config import load_config
from mirotrain.training.distributed import destroy_distributed
from mirotrain.training.dpo import run_dpo
from dpo_helpers import TINY_DPO, tiny_overrides

pytestmark = pytest.mark.slow  # three reference passes of the tiny DPO recipe in this process


def _reference_dir(data: dict, output_dir: Path, *extra: str) -> Path:
    try:
        summary = run_dpo(load_config(TINY_DPO, tiny_overrides(data, output_dir, *extra)), precompute_only=True)
    finally:
        destroy_distributed()
    (ref_dir,) = summary["reference_dirs"].values()
    return Path(ref_dir)


def _logps(ref_dir: Path) -> torch.Tensor:
    from mirotrain.data.preference import DPOShardReader

    reader = DPOShardReader(str(ref_dir))
    return torch.cat([torch.tensor(reader.row(i)["ref_chosen_logp"]) for i in range(len(reader))])


def test_tiled_and_untiled_runs_keep_separate_reference_caches(preference_data, tmp_path):
    data = dict(preference_data, packed=str(tmp_path / "packed"))  # a private cache for this test
    untiled = _reference_dir(data, tmp_path / "untiled")
    stamp = (untiled / "manifest.json").stat().st_mtime_ns
    tiled = _reference_dir(data, tmp_path / "tiled", "mlp_tiles=3")
    assert tiled != untiled and json.loads((tiled / "manifest.json").read_text())["extra_pair_columns"]
    torch.testing.assert_close(_logps(tiled), _logps(untiled), rtol=1e-6, atol=0)  # the same up to rounding
    assert _reference_dir(data, tmp_path / "explicit", "mlp_tiles=1") == untiled
    assert (untiled / "manifest.json").stat().st_mtime_ns == stamp  # a cache hit, not recomputed
