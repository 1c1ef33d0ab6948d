"""The trainer's memory plan (mirotrain/training/builders.py: ``ModelSpec.from_config``): a plan the config
settles costs no meta model, no card query and no all-reduce; only an ``auto`` setting with a card to decide
against does.

The configs below name a model builder that does not exist, so building the (meta) model raises; and this
machine has no CUDA, so asking a ``cuda`` device for its memory raises too. A plan that comes back proves
neither happened."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mirotrain.config import load_config
from mirotrain.config.tree import TrainConfig
from mirotrain.training.builders import ModelSpec

TINY_SFT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs" / "tiny" / "sft.yaml"
UNBUILDABLE = "model._component_=mirotrain.no_such_module.qwen3"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (see the docstring)")


def _spec(device: str, *overrides: str) -> ModelSpec:
    cfg = TrainConfig.from_dict(load_config(TINY_SFT, [UNBUILDABLE, *overrides]))
    return ModelSpec.from_config(cfg, torch.device(device), world_size=2)


@pytest.mark.parametrize("device, overrides, plan", [
    ("cuda", ["enable_activation_checkpointing=true", "mlp_tiles=4"], ("full", None, 4)),
    ("cuda", ["enable_activation_checkpointing=false", "mlp_tiles=1"], ("none", None, 1)),
    ("cuda", ["ac_mode=selective", "ac_option=2", "mlp_tiles=2"], ("selective", 2, 2)),
    # mlp_tiles: auto (the default) under per-op selective AC is 1 without an estimate
    ("cuda", ["ac_mode=selective"], ("selective", "op", 1)),
    # no card to decide against: auto is full AC, mlp_tiles auto 1
    ("cpu", ["enable_activation_checkpointing=true", "ac_mode=auto"], ("full", None, 1)),
    ("cpu", ["enable_activation_checkpointing=true"], ("full", None, 1)),
])
def test_a_settled_plan_builds_no_model_and_asks_no_card(device, overrides, plan):
    spec = _spec(device, *overrides)
    assert (spec.ac_mode, spec.ac_option, spec.mlp_tiles) == plan


@pytest.mark.parametrize("overrides", [["enable_activation_checkpointing=true"],  # mlp_tiles: auto
                                       ["enable_activation_checkpointing=true", "ac_mode=auto", "mlp_tiles=1"]])
def test_an_auto_setting_on_a_gpu_asks_the_card(overrides):
    """The other side: with something to decide on CUDA the trainer reads the card (which fails here), so the
    test above can tell the two apart."""
    with pytest.raises((RuntimeError, AssertionError), match="CUDA"):
        _spec("cuda", *overrides)
