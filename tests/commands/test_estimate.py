"""validate's memory estimate responds to what the run holds: the DPO row and live reference, the state's
bytes per parameter, CPU offload and sequence parallelism (mirotrain/commands/estimate.py)."""

from pathlib import Path

import pytest
import torch

from mirotrain.commands.estimate import (checkpoint_bytes_per_param, estimate_memory, row_tokens,
                                         state_bytes_per_param)
from mirotrain.commands.validate import main as validate
from mirotrain.config import instantiate, load_config
from mirotrain.config.tree import TrainConfig

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs"
SFT_8B = CONFIG_ROOT / "qwen3" / "8B_full_sft.yaml"
DPO_8B = CONFIG_ROOT / "qwen3" / "8B_full_dpo.yaml"
WORLD = 8


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate(load_config(str(SFT_8B), [])["model"])


def _cfg(path: Path, *overrides: str, drop_packed_seq_len: bool = False) -> TrainConfig:
    raw = load_config(str(path), list(overrides))
    if drop_packed_seq_len:
        raw["dataset"].pop("packed_seq_len")
    return TrainConfig.from_dict(raw)


def test_dpo_costs_more_than_sft_at_the_same_row_length(model):
    """Same 32K-token row, same activations; DPO's log-prob head keeps its chunk's fp32 logits and the trained
    positions' hidden states, and a live reference adds a bf16 copy of the model."""
    sft = estimate_memory(model, _cfg(SFT_8B, "dataset.packed=True", "dataset.packed_seq_len=32768"), WORLD)
    dpo = estimate_memory(model, _cfg(DPO_8B, "dataset.packed_seq_len=32768"), WORLD)
    live = estimate_memory(model, _cfg(DPO_8B, "dataset.packed_seq_len=32768", "reference=live"), WORLD)
    assert sft.tokens_per_gpu == dpo.tokens_per_gpu == 32768
    assert dpo.activations == sft.activations
    assert sft.total < dpo.total < live.total
    assert dpo.reference == 0 and live.reference == 2 * dpo.params // WORLD


def test_a_dpo_row_without_packed_seq_len_holds_chosen_and_rejected():
    """MiroTrain's pair layout: each of the two documents up to max_seq_len (8B_full_dpo: 16K)."""
    assert row_tokens(_cfg(DPO_8B, drop_packed_seq_len=True), preference=True) == 2 * 16384
    assert row_tokens(_cfg(SFT_8B), preference=False) == 16384


def test_sequence_parallelism_halves_the_activations_and_adds_all_to_all_buffers(model):
    one = estimate_memory(model, _cfg(SFT_8B, "ulysses_sequence_parallel_size=1"), WORLD)
    two = estimate_memory(model, _cfg(SFT_8B, "ulysses_sequence_parallel_size=2"), WORLD)
    assert two.tokens_per_gpu * 2 == one.tokens_per_gpu
    assert two.activations * 2 == pytest.approx(one.activations, rel=1e-6)
    assert one.all_to_all == 0 < two.all_to_all < two.activations
    assert two.sharded_state == one.sharded_state


def test_cpu_offload_moves_the_state_to_the_host(model):
    gpu = estimate_memory(model, _cfg(DPO_8B, "reference=live"), WORLD)
    host = estimate_memory(model, _cfg(DPO_8B, "reference=live", "fsdp_cpu_offload=True"), WORLD)
    assert host.sharded_state == host.reference == 0
    assert host.host_state_per_rank == gpu.sharded_state + gpu.reference
    assert gpu.total - host.total == gpu.sharded_state + gpu.reference


@pytest.mark.parametrize("mode, state, checkpoint", [("fp32", 16, 12), ("bf16", 10, 8), ("bf16_plain", 8, 6)])
def test_state_bytes_per_param_sets_the_sharded_state(model, mode, state, checkpoint):
    """fp32 masters + fp32 AdamW; bf16 weights, gradients, moments + compensation; bf16 without it. The
    trainer's measured figures: tests/training/test_master_weights.py."""
    cfg = _cfg(SFT_8B, f"master_weights={mode}")
    assert (state_bytes_per_param(cfg), checkpoint_bytes_per_param(cfg)) == (state, checkpoint)
    assert estimate_memory(model, cfg, WORLD).sharded_state == state * sum(p.numel() for p in model.parameters()) // WORLD


def test_validate_prints_the_breakdown(capsys):
    args = ["--config", str(DPO_8B), "--world-size", "8", "--no-file-check", "ulysses_sequence_parallel_size=2",
            "reference=live", "fsdp_cpu_offload=True"]
    assert validate(args) == 0
    out = {line[:12]: line for line in capsys.readouterr().out.splitlines()}
    assert out["tokens/GPU: "] == "tokens/GPU:  16,384 per micro-batch (DPO row of 32,768 tokens: pairs, chosen and " \
                                  "rejected, / SP 2)"
    assert out["memory/GPU: "].startswith("memory/GPU:  ~")
    assert "(sharded state 0.0, gathered params 0.7, activations 8.2, loss " in out["memory/GPU: "]
    assert "live reference" not in out["memory/GPU: "] and ", SP all-to-all 0." in out["memory/GPU: "]
    assert out["state:      "].startswith("state:       16 bytes/param, master_weights: fp32 (fp32 master weights, "
                                          "gradients, AdamW moments), sharded over 8 ranks, on the host "
                                          "(fsdp_cpu_offload): ~")
    assert out["state:      "].endswith(" GiB of host memory per node of 8 GPUs")
    assert out["notice:     "].startswith("notice:      dtype: bf16 computes in bf16 and keeps fp32 master weights")
    assert "master_weights: bf16 keeps bf16 ones with compensated updates (10 bytes/param)" in out["notice:     "]


def test_validate_prints_the_bf16_mode_and_its_bytes(capsys):
    """A chosen mode is printed with its bytes per parameter, and the notice about dtype: bf16 is not."""
    assert validate(["--config", str(SFT_8B), "--world-size", "8", "--no-file-check", "master_weights=bf16"]) == 0
    out = {line[:12]: line for line in capsys.readouterr().out.splitlines()}
    assert out["state:      "] == ("state:       10 bytes/param, master_weights: bf16 (bf16 weights, gradients, AdamW "
                                   "moments and update compensation), sharded over 8 ranks, on the GPU")
    assert "notice:     " not in out
    assert out["checkpoints:"].startswith("checkpoints: ~61 GiB each on disk")  # 8 bytes/param: weight + AdamW state


def test_bf16_modes_need_bf16_compute_and_the_bf16_mode_needs_adamw(capsys):
    tiny = str(CONFIG_ROOT / "tiny" / "sft.yaml")
    assert validate(["--config", tiny, "--no-file-check", "master_weights=bf16_plain"]) == 2
    assert "config key 'master_weights': bf16_plain keeps bf16 weights and needs dtype: bf16, got dtype: fp32" in \
        capsys.readouterr().err
    assert validate(["--config", tiny, "--no-file-check", "dtype=bf16", "master_weights=bf16",
                     "optimizer._component_=torch.optim.SGD"]) == 2
    assert "config key 'optimizer._component_': master_weights: bf16 runs a compensated AdamW and needs " \
        "torch.optim.AdamW, got 'torch.optim.SGD'" in capsys.readouterr().err
    assert validate(["--config", tiny, "--no-file-check", "dtype=bf16", "master_weights=bf16",
                     "optimizer.amsgrad=True"]) == 2
    assert "config key 'optimizer.amsgrad': not supported with master_weights: bf16 (its AdamW takes lr, betas, " \
        "eps, weight_decay)" in capsys.readouterr().err
