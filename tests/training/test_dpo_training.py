"""The DPO recipe end to end on CPU: learning, reference modes, the reference cache, HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mirotrain.config import load_config
from mirotrain.data.collate import padded_collate_dpo
from mirotrain.data.preference import DPOShardReader
from mirotrain.training.distributed import destroy_distributed
from mirotrain.training.dpo import run_dpo
from mirotrain.training.reference import forward_pair_logprobs
from dpo_helpers import TINY_DPO, tiny_overrides

# The DPO recipe end to end in this process (pack, reference pass, training, checkpoints, HF export): the
# integration scale of the slow tier.
pytestmark = pytest.mark.slow


def _run(overrides: list[str], **kw) -> dict:
    try:
        return run_dpo(load_config(TINY_DPO, overrides), **kw)
    finally:
        destroy_distributed()


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def _heldout_accuracy(policy, reference, shard_dir: str) -> float:
    """Fraction of held-out pairs whose implicit reward prefers the chosen answer."""
    reader = DPOShardReader(shard_dir)
    right = total = 0
    for i in range(len(reader)):
        batch = padded_collate_dpo([reader.row(i)], pad_id=int(reader.manifest["pad_id"]))
        p = forward_pair_logprobs(policy, batch)
        r = forward_pair_logprobs(reference, batch)
        margin = (p["chosen_logps"] - r["chosen_logps"]) - (p["rejected_logps"] - r["rejected_logps"])
        right += int((margin > 0).sum())
        total += margin.numel()
    return right / total


def test_tiny_model_learns_preferences(preference_data, tmp_path):
    """Reward accuracy > 0.9 on *held-out* pairs after a few steps (and on the training batches)."""
    out = tmp_path / "run"
    summary = _run(tiny_overrides(preference_data, out, "epochs=1", "max_steps_per_epoch=6", "auto_resume=False"))
    assert summary["steps"] == 6
    rows = _metrics(out)
    assert rows[0]["loss"] == torch.nn.functional.softplus(torch.tensor(0.0)).item()  # policy == reference: log 2
    assert rows[-1]["rewards/accuracies"] > 0.9 and rows[-1]["loss"] < rows[0]["loss"]

    from mirotrain.config.tree import TrainConfig
    from mirotrain.data.pack_shards import pack_dataset
    from mirotrain.models import from_pretrained
    from mirotrain.models.qwen3.builders import qwen3

    cfg = load_config(TINY_DPO, tiny_overrides(preference_data, out, f"dataset.data_files={preference_data['heldout']}"))
    heldout_dir = pack_dataset(TrainConfig.from_dict(cfg))
    policy = from_pretrained(summary["hf_dir"]).eval()
    model_args = {k: v for k, v in cfg["model"].items() if k != "_component_"}
    reference = qwen3(**model_args)
    reference.init_weights(seed=cfg["seed"])  # checkpoint_dir null: the run started from this seeded init
    assert _heldout_accuracy(policy, reference.eval(), heldout_dir) > 0.9


def test_precomputed_and_live_reference_give_the_same_losses(preference_data, tmp_path):
    steps = ["epochs=1", "max_steps_per_epoch=3", "auto_resume=False"]
    _run(tiny_overrides(preference_data, tmp_path / "pre", "reference=precompute", *steps))
    _run(tiny_overrides(preference_data, tmp_path / "live", "reference=live", *steps))
    pre, live = _metrics(tmp_path / "pre"), _metrics(tmp_path / "live")
    assert len(pre) == len(live) == 3
    for a, b in zip(pre, live):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_precompute_only_fills_the_cache_training_reuses(preference_data, tmp_path):
    data = dict(preference_data, packed=str(tmp_path / "packed"))  # a private cache for this test
    summary = _run(tiny_overrides(data, tmp_path / "pre"), precompute_only=True)
    (ref_dir,) = summary["reference_dirs"].values()
    manifest = json.loads((Path(ref_dir) / "manifest.json").read_text())
    assert {"ref_chosen_logp", "ref_rejected_logp"} <= set(manifest["extra_pair_columns"])
    assert not (tmp_path / "pre" / "metrics.jsonl").exists()  # no training happened
    stamp = (Path(ref_dir) / "manifest.json").stat().st_mtime_ns
    summary = _run(tiny_overrides(data, tmp_path / "train", "epochs=1", "max_steps_per_epoch=1", "auto_resume=False"))
    assert (Path(ref_dir) / "manifest.json").stat().st_mtime_ns == stamp  # cache hit, not recomputed
    assert summary["steps"] == 1
    # the pipeline re-runs the pass before resuming a run in the same output_dir: its history must survive
    history = (tmp_path / "train" / "metrics.jsonl").read_text()
    _run(tiny_overrides(data, tmp_path / "train"), precompute_only=True)
    assert (tmp_path / "train" / "metrics.jsonl").read_text() == history


def test_token_rate_counts_trained_tokens_and_pairs_have_their_own(preference_data, tmp_path):
    """``trained_tokens_per_sec_per_gpu`` counts labelled tokens, as in SFT, ``pairs_per_sec_per_gpu`` counts
    pairs, and the summary's ``trained_tokens`` is the labelled tokens of the rows trained on."""
    from mirotrain.config.tree import TrainConfig
    from mirotrain.data.loader import build_train_loader

    overrides = tiny_overrides(preference_data, tmp_path / "run", "epochs=1", "max_steps_per_epoch=2",
                               "auto_resume=False")
    summary = _run(overrides)
    rows = _metrics(tmp_path / "run")
    cfg = TrainConfig.from_dict(load_config(TINY_DPO, overrides))
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=cfg.run.seed)  # the run's rows, in its order
    loader.set_epoch(0)
    batches = [batch for batch, _ in zip(loader, range(2))]
    tokens = [batch.num_targets() for batch in batches]
    assert [row["pairs"] for row in rows] == [batch.num_pairs for batch in batches]
    assert summary["trained_tokens"] == sum(tokens) >= 2 * sum(row["pairs"] for row in rows)  # chosen + rejected
    for row, n in zip(rows, tokens):
        rate_ratio = row["trained_tokens_per_sec_per_gpu"] / row["pairs_per_sec_per_gpu"]
        assert abs(rate_ratio - n / row["pairs"]) <= 1e-9 * rate_ratio


def test_export_loads_in_transformers(preference_data, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = _run(tiny_overrides(preference_data, tmp_path / "run", "epochs=1", "max_steps_per_epoch=1",
                                  "auto_resume=False"))
    model = AutoModelForCausalLM.from_pretrained(summary["hf_dir"], dtype=torch.float32)
    assert model.config.model_type == "qwen3"


def test_validation_set_gets_its_own_reference_and_a_mean_pair_loss(preference_data, tmp_path):
    val = {"_component_": "torchtune.datasets.preference_dataset", "source": "json",
           "data_files": preference_data["heldout"], "packed_seq_len": 512, "num_workers": 0,
           "output_dir": preference_data["packed"]}
    overrides = tiny_overrides(preference_data, tmp_path / "run", "epochs=1", "max_steps_per_epoch=3",
                               "auto_resume=False", "run_val_every_n_steps=3")
    cfg = load_config(TINY_DPO, overrides)
    cfg["dataset_val"] = val
    try:
        summary = run_dpo(cfg)
    finally:
        destroy_distributed()
    # the model learned on the training pairs; the held-out pairs follow the same pattern
    assert summary["val_loss"] is not None and summary["val_loss"] < 0.69
