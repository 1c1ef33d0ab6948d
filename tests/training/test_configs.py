"""Shipped SFT configs resolve, validate and build; MiroTrain's compatibility keys are accepted with a warning
or refused with an error that names the key."""

import logging
from pathlib import Path

import pytest

from sft_helpers import REPO, tiny_config, write_shards

from mirotrain.config import ConfigError, load_config
from mirotrain.config.tree import TrainConfig
from mirotrain.config.validation import validate_config
from mirotrain.training.builders import build_meta_model
from mirotrain.training.distributed import destroy_distributed

SFT_CONFIGS = sorted(p for p in (REPO / "mirotrain" / "configs").rglob("*.yaml") if "dpo" not in p.name)


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "mirotrain" / "configs")))
def test_shipped_sft_config_validates_and_builds(path: Path):
    cfg = load_config(path)
    assert validate_config(cfg, world_size=8, check_files=False) == []
    tree = TrainConfig.from_dict(cfg)
    model = build_meta_model(tree.model.component, tree.model.attention_backend)
    assert model.args.n_layers >= 2
    if "yarn" in path.name:
        assert model.args.rope_scaling["rope_type"] == "yarn" and model.args.max_seq_len == 163840


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", n_rows=4, seq_len=32, seed=0)


def test_compatibility_keys_are_accepted_with_a_warning(tmp_path, shards, caplog):
    from mirotrain.training.sft import SFTTrainer

    cfg = tiny_config(tmp_path / "run", shards, custom_sharded_layers=["tok_embeddings"], optimizer_in_bwd=True,
                      use_flash_attention=False, collate_fn="torchtune.data.padded_collate_packed",
                      resume_from_checkpoint=True, fp8_recipe_name=None, enable_activation_checkpointing=True,
                      enable_activation_offloading=True, activation_offloading_use_streams=True,
                      profiler={"enabled": False}, enable_memory_trace=True, data_parallel_shard_dim=-1,
                      ac_mode="selective", ac_option="op", epochs=1, max_steps_per_epoch=1)
    caplog.set_level(logging.WARNING)
    try:
        summary = SFTTrainer(cfg).train()
    finally:
        destroy_distributed()
    assert summary["steps"] == 1
    for key in ("custom_sharded_layers", "optimizer_in_bwd", "collate_fn", "resume_from_checkpoint",
                "enable_activation_offloading"):
        assert key in caplog.text, key


@pytest.mark.parametrize("override, key", [({"tensor_parallel_dim": 2}, "tensor_parallel_dim"),
                                           ({"enable_fp8_training": True}, "enable_fp8_training"),
                                           ({"data_parallel_replicate_dim": 2}, "data_parallel_replicate_dim"),
                                           ({"dtype": "fp16"}, "dtype")])
def test_unsupported_settings_fail_naming_the_key(tmp_path, shards, override, key):
    from mirotrain.training.sft import SFTTrainer

    cfg = tiny_config(tmp_path / "run", shards, **override)
    try:
        with pytest.raises((ConfigError, ValueError), match=key):
            SFTTrainer(cfg)
    finally:
        destroy_distributed()
