"""Config loading, overrides, interpolation, registry and validation errors."""

import textwrap

import pytest

from mirotrain.config import ConfigError, apply_overrides, instantiate, load_config
from mirotrain.config.validation import validate_config


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_interpolation_overrides_and_types(tmp_path, monkeypatch):
    monkeypatch.setenv("MT_ROOT", "/data")
    path = write(tmp_path, """
        output_dir: ${env:MT_ROOT}/run
        lr: 1e-5
        optimizer:
          lr: ${lr}
          fused: true
        metric_logger:
          log_dir: ${output_dir}/logs
    """)
    cfg = load_config(path, ["optimizer.lr=2e-5", "epochs=3", "dataset.packed=True"])
    assert cfg["output_dir"] == "/data/run"
    assert cfg["optimizer"]["lr"] == 2e-5 and isinstance(cfg["optimizer"]["lr"], float)
    assert cfg["lr"] == 1e-5 and isinstance(cfg["lr"], float)
    assert cfg["metric_logger"]["log_dir"] == "/data/run/logs"
    assert cfg["epochs"] == 3 and cfg["dataset"] == {"packed": True}


def test_interpolation_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'a.b'.*missing key"):
        load_config(write(tmp_path, "a:\n  b: ${nope}"))
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path, "a: ${b}\nb: ${a}"))
    with pytest.raises(ConfigError, match="line 2"):
        load_config(write(tmp_path, "a: 1\nb: [unclosed\n"))
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["justakey"])


def test_torchtune_names_resolve_to_ours():
    import torch

    opt = instantiate({"_component_": "torch.optim.AdamW", "lr": 1e-3}, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW)
    from mirotrain.config import resolve_component
    from mirotrain.checkpoint.hf_checkpointer import FullModelHFCheckpointer

    assert resolve_component("torchtune.training.FullModelHFCheckpointer") is FullModelHFCheckpointer
    with pytest.raises(ValueError, match="did you mean mirotrain.models.qwen3.qwen3_8b_instruct"):
        resolve_component("mirotrain.models.qwen3.qwen3_8b_instrct")


def base_cfg(tmp_path):
    return {
        "output_dir": str(tmp_path),
        "model": {"_component_": "mirotrain.models.qwen3.qwen3_0_6b_base"},
        "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "path": str(tmp_path), "max_seq_len": 1024},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-5},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(tmp_path),
                         "model_type": "QWEN3"},
        "batch_size": 1,
    }


def messages(errors):
    return [str(e) for e in errors]


def test_valid_base_config(tmp_path):
    assert validate_config(base_cfg(tmp_path)) == []


def test_unknown_key_suggests_closest(tmp_path):
    cfg = base_cfg(tmp_path) | {"gradient_accumulation_step": 2}
    assert messages(validate_config(cfg)) == ["config key 'gradient_accumulation_step': unknown key; did you mean 'gradient_accumulation_steps'?"]
    cfg = base_cfg(tmp_path)
    cfg["checkpointer"]["checkpoint_dirr"] = "x"
    assert any("checkpointer.checkpoint_dirr': unknown key; did you mean 'checkpoint_dir'" in m for m in messages(validate_config(cfg)))


def test_bad_type(tmp_path):
    cfg = base_cfg(tmp_path) | {"epochs": "three"}
    assert messages(validate_config(cfg)) == ["config key 'epochs': expected int, got str ('three')"]


def test_missing_file(tmp_path):
    cfg = base_cfg(tmp_path)
    cfg["tokenizer"]["path"] = str(tmp_path / "missing")
    assert messages(validate_config(cfg)) == [f"config key 'tokenizer.path': path does not exist: {tmp_path / 'missing'}"]


def test_packed_and_streaming_are_exclusive(tmp_path):
    cfg = base_cfg(tmp_path) | {"dataset": {"_component_": "mirotrain.datasets.odr_chat_dataset", "packed": True,
                                            "streaming_pack": True, "packed_seq_len": 2048}}
    assert any("mutually exclusive" in m for m in messages(validate_config(cfg, check_files=False)))


def test_data_keys_are_required_unless_shards_are_given(tmp_path):
    section = {"_component_": "mirotrain.datasets.odr_chat_dataset", "source": "json", "packed": True,
               "packed_seq_len": 2048}
    missing = messages(validate_config(base_cfg(tmp_path) | {"dataset": dict(section)}, check_files=False))
    assert any("'dataset.data_files': required with source 'json'" in m for m in missing)
    with_shards = base_cfg(tmp_path) | {"dataset": dict(section, shard_dir=str(tmp_path))}
    assert validate_config(with_shards, check_files=False) == []
    # pre-packed preference shards: the row length comes from their manifest
    pairs = {"_component_": "torchtune.datasets.preference_dataset", "shard_dir": str(tmp_path)}
    assert validate_config(base_cfg(tmp_path) | {"dataset": pairs}, check_files=False) == []
    del pairs["shard_dir"]
    assert any("'dataset.packed_seq_len': required" in m
               for m in messages(validate_config(base_cfg(tmp_path) | {"dataset": pairs}, check_files=False)))


def test_unsupported_compat_keys(tmp_path):
    cfg = base_cfg(tmp_path) | {"tensor_parallel_dim": 2, "dtype": "fp16"}
    found = messages(validate_config(cfg))
    assert any("tensor_parallel_dim" in m and "not supported" in m for m in found)
    assert any("'dtype'" in m for m in found)


def test_config_errors_survive_pickling():
    """Ranks and worker processes pass errors on pickled (a broadcast of rank 0's error): they must rebuild."""
    import pickle

    from mirotrain.config import ConfigError
    from mirotrain.config.validation import InvalidConfig

    one = ConfigError("optimizer.lr", "expected int or float, got str ('abc')", source="c.yaml")
    again = pickle.loads(pickle.dumps(one))
    assert type(again) is ConfigError and str(again) == str(one) and again.key == "optimizer.lr"
    many = InvalidConfig([ConfigError("epochs", "must be >= 1, got 0"), ConfigError("device", "bad")], "c.yaml")
    back = pickle.loads(pickle.dumps(many))
    assert [str(e) for e in back.errors] == [str(e) for e in many.errors] and str(back) == str(many)
