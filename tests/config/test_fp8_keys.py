"""`enable_fp8_training` / `fp8_recipe_name` (mirotrain/config/schema.py: ModelConfig): what the config checks
refuse, each in one line naming the key, and what `mirotrain validate` prints for a valid FP8 config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirotrain.commands.validate import main as validate
from mirotrain.config.validation import validate_config

QWEN3_8B_SFT = str(Path(__file__).resolve().parents[2] / "mirotrain" / "configs" / "qwen3" / "8B_full_sft.yaml")


def base_cfg(tmp_path: Path) -> dict:
    return {"output_dir": str(tmp_path), "model": {"_component_": "mirotrain.models.qwen3.qwen3_0_6b_base"},
            "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "path": None},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-5}, "batch_size": 1}


def messages(cfg: dict) -> list[str]:
    return [str(e) for e in validate_config(cfg, check_files=False)]


@pytest.mark.parametrize("keys, expected", [
    ({"device": "cpu"}, "config key 'enable_fp8_training': needs a CUDA GPU with float8 matmuls (compute capability "
                        ">= 8.9: Ada, Hopper or newer), got device: cpu"),
    ({"mlp_tiles": 4}, "config key 'mlp_tiles': (4) tiled MLPs would bypass enable_fp8_training's float8 Linears: "
                       "use mlp_tiles: 1 (auto stays untiled with FP8)"),
    ({"fp8_recipe_name": "blockwise"}, "config key 'fp8_recipe_name': must be one of tensorwise, rowwise, "
                                       "rowwise_with_gw_hp, null, got 'blockwise'"),
])
def test_fp8_refusals_name_the_key(tmp_path, keys, expected):
    cfg = base_cfg(tmp_path) | {"enable_fp8_training": True} | keys
    assert messages(cfg) == [expected]


@pytest.mark.parametrize("recipe", [None, "tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_fp8_on_cuda_is_valid(tmp_path, recipe):
    cfg = base_cfg(tmp_path) | {"enable_fp8_training": True, "fp8_recipe_name": recipe, "mlp_tiles": 1}
    assert messages(cfg) == []


def test_validate_prints_the_fp8_plan(capsys):
    args = ["--config", QWEN3_8B_SFT, "--world-size", "2", "--no-file-check", "enable_fp8_training=True"]
    assert validate(args) == 0
    fp8 = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fp8:")]
    assert fp8 == ["fp8:         enable_fp8_training: tensorwise float8 matmuls in 252 Linears (attention q/k/v/o "
                   "and dense MLPs of 36 decoder layers); embedding, LM head, norms in bf16; weights all-gathered "
                   "in fp8, scales after each optimizer step; needs compute capability >= 8.9 (checked at "
                   "start-up); the memory estimate above counts bf16 matmuls"]
    assert validate(args[:-1]) == 0
    assert not any(line.startswith("fp8:") for line in capsys.readouterr().out.splitlines())
