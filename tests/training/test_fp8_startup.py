"""FP8 at start-up (mirotrain/training/builders.py: ``ModelSpec.from_config``): the run's device is checked
for float8 matmuls before anything is built, and the memory plan keeps MLPs untiled under FP8 (a tiled MLP
would bypass the float8 Linears) without asking the card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mirotrain.commands.estimate import MemoryPlan, settled_plan
from mirotrain.config import load_config
from mirotrain.config.tree import TrainConfig
from mirotrain.training.builders import ModelSpec

TINY_SFT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs" / "tiny" / "sft.yaml"


def _cfg(*overrides: str) -> TrainConfig:
    return TrainConfig.from_dict(load_config(TINY_SFT, list(overrides)))


def test_a_device_without_float8_matmuls_is_refused_at_start_up():
    cfg = _cfg("enable_fp8_training=True")
    with pytest.raises(ValueError, match="enable_fp8_training: needs a CUDA GPU with float8 matmuls .* the run is on "
                                         "cpu; set enable_fp8_training: False"):
        ModelSpec.from_config(cfg, torch.device("cpu"), world_size=1)


def test_fp8_off_builds_no_recipe():
    assert ModelSpec.from_config(_cfg(), torch.device("cpu"), world_size=1).fp8_recipe is None


def test_auto_tiles_stay_untiled_under_fp8_without_an_estimate():
    full_ac = "enable_activation_checkpointing=True"
    assert settled_plan(_cfg(full_ac), gpu_known=True) is None  # without FP8 auto is decided against the card
    assert settled_plan(_cfg(full_ac, "enable_fp8_training=True"), gpu_known=True) == MemoryPlan("full", None, 1)
