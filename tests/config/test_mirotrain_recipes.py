"""MiroTrain v0.1's recipe configs (reconstructed in tests/fixtures/mirotrain_v0_1) load unchanged, paths aside,
and mean what they meant there: translated keys say so in one notice each."""

import logging
from pathlib import Path

import pytest
import torch

from mirotrain.commands.validate import main as validate
from mirotrain.config import load_config
from mirotrain.config.compat import translate_mirotrain
from mirotrain.config.tree import TrainConfig, parse_config, replace_section
from mirotrain.config.validation import validate_config

RECIPES = Path(__file__).resolve().parents[1] / "fixtures" / "mirotrain_v0_1" / "recipes" / "configs"
CONFIGS = sorted(RECIPES.rglob("*.yaml"))
# MiroTrain itself refuses these two: their tokenizer.max_seq_len (131072) exceeds the packed rows (32768)
REFUSED = {"qwen3_yarn/8B_yarn_full_sft.yaml", "qwen3_yarn/32B_yarn_full_sft.yaml"}
SFT = RECIPES / "mirothinker_v0_1" / "MiroThinker-v0.1-8B-SFT-40k-bs128-packed.yaml"
DPO = RECIPES / "qwen3" / "32B_full_dpo.yaml"
SHIPPED = Path(__file__).resolve().parents[2] / "mirotrain" / "configs"


def name(path: Path) -> str:
    return path.relative_to(RECIPES).as_posix()


def path_overrides(raw: dict, tmp_path: Path) -> list[str]:
    """The only keys a user changes: where the weights, the tokenizer and the outputs are."""
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    overrides = [f"output_dir={tmp_path / 'out'}", f"checkpointer.checkpoint_dir={weights}", f"tokenizer.path={weights}"]
    if "ref_checkpointer" in raw:
        overrides.append(f"ref_checkpointer.checkpoint_dir={weights}")
    return overrides


def test_all_fifteen_recipes_are_there():
    assert len(CONFIGS) == 15
    assert {p.parent.name for p in CONFIGS} == {"mirothinker_v0_1", "qwen3", "qwen3_moe", "qwen3_yarn"}


@pytest.mark.parametrize("path", CONFIGS, ids=name)
def test_validate_passes_with_existing_paths(path, tmp_path, capsys):
    raw = load_config(path)
    code = validate(["--config", str(path), "--world-size", "8", *path_overrides(raw, tmp_path)])
    out, err = capsys.readouterr()
    if name(path) in REFUSED:
        assert code == 2
        assert err.strip().splitlines() == [f"mirotrain validate: {path}: config key 'dataset.packed_seq_len': "
                                            "(32768) must be >= tokenizer.max_seq_len (131072)"]
    else:
        assert code == 0, err
        assert "config is valid" in out


@pytest.mark.parametrize("path", CONFIGS, ids=name)
def test_the_tree_gives_back_the_translated_file(path):
    raw = load_config(path)
    assert TrainConfig.from_dict(raw).to_dict() == raw
    assert translate_mirotrain(raw) == (raw, [])  # translated once: nothing left to translate


def test_profiler_section_is_typed():
    errors = {e.key: e.detail for e in validate_config(load_config(SFT, ["profiler.wait_steps=-1",
                                                                         "profiler.with_stack=maybe",
                                                                         "profiler.active_step=2"]),
                                                       world_size=8, check_files=False)}
    assert errors == {"profiler.wait_steps": "must be >= 0, got -1",
                      "profiler.with_stack": "expected bool, got str ('maybe')",
                      "profiler.active_step": "unknown key; did you mean 'active_steps'?"}
    cfg = parse_config(load_config(SFT), world_size=8, check_files=False)
    assert cfg.metrics.profiler["output_dir"] == "/path/to/output/mirothinker_v0_1_8b_sft/profiling_outputs"


def test_resume_from_checkpoint_resumes_from_step_checkpoints(caplog):
    with caplog.at_level(logging.WARNING, logger="mirotrain.config"):
        raw = load_config(SFT, ["resume_from_checkpoint=True"])
    assert raw["auto_resume"] is True and "resume_from_checkpoint" not in raw
    [notice] = [r.getMessage() for r in caplog.records]
    assert notice.startswith(f"{SFT}: config key 'resume_from_checkpoint': True is read as auto_resume: True")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mirotrain.config"):
        assert load_config(SFT)["resume_from_checkpoint"] is False  # False stays as written: no notice
    assert not caplog.records


def test_dpo_rows_hold_two_max_seq_len_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING, logger="mirotrain.config"):
        raw = load_config(DPO)
    assert raw["dataset"]["packed_seq_len"] == 2 * 22000
    [notice] = [r.getMessage() for r in caplog.records]
    assert "config key 'dataset.packed_seq_len': not set, so 44000 (2 × tokenizer.max_seq_len)" in notice
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mirotrain.config"):
        assert load_config(DPO, ["dataset.packed_seq_len=50000"])["dataset"]["packed_seq_len"] == 50000
    assert not caplog.records


@pytest.mark.parametrize("length", [40960, 4097, 4096, 1000, 3, 1])
def test_unembed_chunk_size_4_gives_4_chunks(length):
    """MiroTrain's meaning: the number of chunks (as torch.chunk, so fewer only below 4 tokens)."""
    cfg = parse_config(load_config(SFT, ["unembed_chunk_size=4"]), world_size=8, check_files=False)
    per_chunk = cfg.model.chunk_tokens(length)
    chunks = [min(length, start + per_chunk) - start for start in range(0, length, per_chunk)]
    assert sum(chunks) == length
    assert len(chunks) == len(torch.arange(length).chunk(4)) == min(4, length)


def test_loss_chunk_tokens_is_tokens_per_chunk_and_excludes_unembed_chunk_size():
    cfg = parse_config(load_config(SFT, ["loss_chunk_tokens=1024"]), world_size=8, check_files=False)
    assert cfg.model.chunk_tokens(40960) == 1024
    assert parse_config(load_config(SFT), world_size=8, check_files=False).model.chunk_tokens(40960) is None
    errors = {e.key: e.detail for e in validate_config(load_config(SFT, ["loss_chunk_tokens=1024",
                                                                         "unembed_chunk_size=4"]),
                                                       world_size=8, check_files=False)}
    assert list(errors) == ["loss_chunk_tokens"] and "not both" in errors["loss_chunk_tokens"]


def _dataset_list(**second) -> list:
    first = {"_component_": "mirotrain.datasets.odr_chat_dataset", "source": "json", "data_files": "/data/a.jsonl",
             "packed": True, "packed_seq_len": 40960}
    return [first, {"_component_": "mirotrain.datasets.odr_chat_dataset", "source": "json", **second}]


def test_a_dataset_list_is_one_section_of_two_builders():
    raw = {**load_config(SFT), "dataset": _dataset_list(data_files="/data/b.jsonl")}
    cfg = parse_config(raw, world_size=8, check_files=False)
    ds = cfg.data.dataset
    assert ds.packed and ds.packed_seq_len == 40960 and len(ds.builders) == 2
    assert cfg.to_dict()["dataset"] == raw["dataset"]
    moved = replace_section(cfg, "data", dataset=ds.with_shard_dir("/shards/x"))
    assert moved.to_dict()["dataset"] == [{**part, "shard_dir": "/shards/x"} for part in raw["dataset"]]


@pytest.mark.parametrize("second,key,message", [
    ({"data_files": "/data/b.jsonl", "packed_seq_len": 65536}, "dataset.1.packed_seq_len",
     "(65536) differs from dataset.0.packed_seq_len (40960): the datasets of a list are packed together"),
    ({}, "dataset.1.data_files", "required with source 'json' (a path, glob, list or fsspec URL)"),
    ({"data_files": "/data/b.jsonl", "conversation_colum": "messages"}, "dataset.1.conversation_colum",
     "unknown key; did you mean 'conversation_column'?"),
])
def test_a_dataset_list_names_the_part_at_fault(second, key, message):
    raw = {**load_config(SFT), "dataset": _dataset_list(**second)}
    errors = {e.key: e.detail for e in validate_config(raw, world_size=8, check_files=False)}
    assert errors == {key: message}


def test_a_dataset_list_of_sft_and_preference_data_is_refused():
    raw = {**load_config(SFT), "dataset": _dataset_list(data_files="/data/b.jsonl")}
    raw["dataset"][1]["_component_"] = "torchtune.datasets.preference_dataset"
    errors = {e.key: e.detail for e in validate_config(raw, world_size=8, check_files=False)}
    assert "mixes preference pairs with SFT data" in errors["dataset"]


def test_unsupported_settings_are_still_refused_by_name():
    errors = {e.key: e.detail for e in validate_config(load_config(SFT, ["tensor_parallel_dim=2"]), world_size=8,
                                                       check_files=False)}
    assert list(errors) == ["tensor_parallel_dim"] and "not supported" in errors["tensor_parallel_dim"]


def test_local_files_replace_a_hub_dataset_by_overrides():
    """alpaca_cleaned_dataset names alpaca_dataset's arguments, so local data_files are a known key."""
    raw = load_config(RECIPES / "qwen3" / "8B_full_sft.yaml", ["dataset.source=json", "dataset.data_files=/d/a.jsonl",
                                                             "dataset.train_on_input=False"])
    assert validate_config(raw, world_size=8, check_files=False) == []


@pytest.mark.parametrize("path, tiled", [
    (RECIPES / "mirothinker_v0_1" / "MiroThinker-v0.1-32B-SFT-40k-bs128-packed.yaml", True),  # 40K rows, SP 1
    (RECIPES / "qwen3" / "32B_full_sft.yaml", True),                                        # 32K rows, SP 1
    (RECIPES / "qwen3" / "32B_full_dpo.yaml", True),                                        # 44K-token pair rows
    (SHIPPED / "mirothinker" / "32B_sft.yaml", True),
    (SHIPPED / "qwen3" / "32B_full_sft.yaml", False),                                       # 16K rows, SP 4
    (SHIPPED / "qwen3" / "32B_full_dpo.yaml", False),
], ids=lambda v: v if isinstance(v, bool) else "/".join(v.parts[-2:]))
def test_the_32b_configs_fit_one_node_of_8x80gb_with_the_bf16_mode(path, tiled, capsys):
    """The 32B quick start: each config at its own layout on 8 GPUs of 80 GB. master_weights: bf16 brings the
    estimate under validate's 90% line; where the recomputed layer's MLP still does not fit (32-44K tokens per
    GPU), ``mlp_tiles: auto`` tiles it and validate says so; with tiling off those warn."""
    args = ["--config", str(path), "--world-size", "8", "--no-file-check", "master_weights=bf16"]
    assert validate(args) == 0
    out = capsys.readouterr().out
    assert "warning:" not in out, out
    assert float(out.split("memory/GPU:  ~")[1].split(" GiB")[0]) <= 0.9 * 79.2
    assert ("plan:        mlp_tiles: auto: each MLP runs in" in out) == tiled
    assert validate([*args, "mlp_tiles=1"]) == 0
    assert ("warning:     that is above 90%" in capsys.readouterr().out) == tiled
