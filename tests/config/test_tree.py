"""The typed config tree: every flat key has one home, shipped configs survive the round trip unchanged (so
resume hashes of existing checkpoints still match), defaults come from the schema, and each section's rules
report the key they are about."""

import dataclasses
from pathlib import Path

import pytest

from mirotrain.config import ConfigError, load_config
from mirotrain.config.schema import KEYS, SECTIONS, DatasetConfig, key_fields
from mirotrain.config.tree import TrainConfig, parse_config, read_config, replace_section
from mirotrain.config.validation import InvalidConfig, validate_config

CONFIGS = sorted(Path("mirotrain/configs").rglob("*.yaml"))
TINY_SFT = "mirotrain/configs/tiny/sft.yaml"
TINY_DPO = "mirotrain/configs/tiny/dpo.yaml"


def test_every_key_has_exactly_one_section_and_a_documented_type():
    homes = [f for cls in SECTIONS.values() for f in key_fields(cls)]
    assert len(homes) == len(KEYS)
    for f in homes:
        spec = f.metadata["key"]
        assert spec.types and spec.doc, f.name
    for name, cls in SECTIONS.items():
        for f in key_fields(cls):  # the docstring lists each key of its section
            assert f"    {f.metadata.get('flat') or f.name}: " in cls.__doc__, (name, f.name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to("mirotrain/configs")))
def test_shipped_configs_round_trip_unchanged(path):
    raw = load_config(path)
    tree = TrainConfig.from_dict(raw)
    assert tree.to_dict() == raw


def test_missing_keys_hold_the_schema_defaults():
    tree = TrainConfig.from_dict({"output_dir": "/tmp/x"})
    for flat, spec in KEYS.items():
        if flat == "output_dir":
            continue
        section, name = next((s, f.name) for s, cls in SECTIONS.items() for f in key_fields(cls)
                             if (f.metadata.get("flat") or f.name) == flat)
        assert getattr(getattr(tree, section), name) == spec.default, flat
    assert tree.to_dict() == {"output_dir": "/tmp/x"}


def test_typed_reads_and_immutable_changes():
    raw = load_config(TINY_SFT, ["gradient_accumulation_steps=3", "dataset.packed_seq_len=4096"])
    cfg = TrainConfig.from_dict(raw)
    assert cfg.optim.gradient_accumulation_steps == 3
    assert cfg.data.dataset.packed_seq_len == 4096 and cfg.data.dataset.node["packed_seq_len"] == 4096
    assert cfg.model.component["_component_"] == raw["model"]["_component_"]
    assert cfg.tokenizer.max_seq_len == raw["tokenizer"].get("max_seq_len")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.epochs = 3  # type: ignore[misc]
    changed = replace_section(cfg, "checkpoint", auto_resume=False, keep_last_n_checkpoints=5)
    assert changed.checkpoint.keep_last_n_checkpoints == 5 and cfg.checkpoint.keep_last_n_checkpoints != 5
    assert changed.to_dict()["keep_last_n_checkpoints"] == 5
    moved = cfg.data.dataset.with_shard_dir("/shards/x")
    assert moved.shard_dir == "/shards/x" and moved.node["shard_dir"] == "/shards/x"
    assert cfg.data.dataset.shard_dir is None


def test_unknown_flat_key_is_refused_by_from_dict():
    with pytest.raises(KeyError, match="batch_sizee"):
        TrainConfig.from_dict({"batch_sizee": 1})


def test_read_config_names_the_file_and_every_bad_key(tmp_path):
    with pytest.raises(InvalidConfig) as info:
        read_config(TINY_SFT, ["optimizer.lr=abc", "lr_scheduler.warmup_ratio=2", "batch_sizee=2"])
    keys = {e.key for e in info.value.errors}
    assert {"optimizer.lr", "lr_scheduler.warmup_ratio", "batch_sizee"} <= keys
    assert all(e.source == TINY_SFT for e in info.value.errors)


def test_parse_config_returns_the_tree_of_a_valid_config():
    cfg = parse_config(load_config(TINY_DPO), check_files=False)
    assert cfg.dpo.reference in ("precompute", "live")
    assert cfg.data.dataset.node["_component_"].endswith("preference_dataset")


def _errors(raw: dict, **kw) -> dict[str, str]:
    return {e.key: e.detail for e in validate_config(raw, check_files=False, **kw)}


def test_preference_rules_live_in_the_dataset_section():
    raw = load_config(TINY_DPO, ["dataset.streaming_pack=true", "batch_size=2"])
    errors = _errors(raw)
    assert "pairs are packed offline" in errors["dataset.streaming_pack"]
    assert "a DPO row holds many pairs" in errors["batch_size"]


def test_section_rules_run_only_on_well_typed_sections():
    raw = load_config(TINY_SFT, ["ulysses_sequence_parallel_size=abc"])
    errors = _errors(raw, world_size=2)
    assert list(errors) == ["ulysses_sequence_parallel_size"] and "expected int" in errors["ulysses_sequence_parallel_size"]
    raw = load_config(TINY_SFT, ["ulysses_sequence_parallel_size=3"])
    assert "must divide the world size (2)" in _errors(raw, world_size=2)["ulysses_sequence_parallel_size"]


def test_dataset_section_check_names_its_section():
    ds = DatasetConfig.from_node({"_component_": "x", "packed": True, "streaming_pack": True, "packed_seq_len": 512})
    errors = ds.check("dataset_val", batch_size=2, batch_key="batch_size_val", max_seq_len=1024,
                      kinds=[("json", False)])
    by_key = {e.key: str(e) for e in errors}
    assert set(by_key) == {"dataset_val.streaming_pack", "dataset_val.data_files", "batch_size_val",
                           "dataset_val.packed_seq_len"}
    assert all(isinstance(e, ConfigError) for e in errors)
