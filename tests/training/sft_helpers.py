"""Helpers for the trainer and checkpoint tests (imported as a plain module; tests/checkpoint adds this
directory to sys.path).

Runs use the real pieces end to end: ``mirotrain sft`` (under torchrun for several ranks), the real data loader
reading Arrow shards written with the data package's own writer. The shards hold synthetic token rows with a
small vocabulary, so a tiny Qwen3 (vocab 256) trains in milliseconds per step on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100
VOCAB = 256
TINY_MODEL = {"_component_": "mirotrain.models.qwen3.qwen3", "vocab_size": VOCAB, "dim": 32, "n_layers": 2,
              "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "hidden_dim": 64, "max_seq_len": 4096,
              "tie_word_embeddings": False}
# Qwen3-MoE of the same size: 4 experts, top-2 (the per-expert loop: the reference path, any width)
TINY_MOE = {"_component_": "mirotrain.models.qwen3_moe.qwen3_moe", "vocab_size": VOCAB, "dim": 32, "n_layers": 2,
            "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "hidden_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_hidden_dim": 32, "max_seq_len": 4096, "moe_backend": "loop", "router_aux_loss_coef": 0.01}


def synthetic_rows(n_rows: int, seq_len: int, seed: int, packed: bool = True) -> list[dict]:
    """Rows of 1-3 documents (packed) or one document each, labels = next token, ~30% prompt tokens masked."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        n_docs = int(rng.integers(1, 4)) if packed else 1
        length = int(rng.integers(seq_len // 2, seq_len + 1)) if packed else seq_len
        cuts = sorted(rng.choice(np.arange(4, length - 3), size=n_docs - 1, replace=False).tolist()) if n_docs > 1 else []
        lens = np.diff([0, *cuts, length])
        ids, labels, pos = [], [], []
        for n in lens:
            doc = rng.integers(0, VOCAB, size=n + 1)
            lab = doc[1:].copy()
            lab[: int(rng.integers(0, max(1, n // 3)))] = IGNORE  # a prompt
            ids.append(doc[:-1]), labels.append(lab), pos.append(np.arange(n))
        rows.append({"input_ids": np.concatenate(ids).astype(np.int32), "labels": np.concatenate(labels).astype(np.int32),
                     "position_ids": np.concatenate(pos).astype(np.int32), "seq_lens": lens.astype(np.int32),
                     "doc_index": np.arange(len(lens), dtype=np.int64)})
    return rows


def write_shards(out_dir: Path, n_rows: int = 16, seq_len: int = 64, seed: int = 0, packed: bool = True) -> str:
    """A shard directory the real loader reads with ``dataset.shard_dir`` (layout packed or docs)."""
    from mirotrain.data.packing import SFT_COLUMNS
    from mirotrain.data.shards import write_rows

    manifest = {"kind": "sft", "layout": "packed" if packed else "docs", "pad_id": 0,
                "packed_seq_len": seq_len if packed else None, "vocab_size": VOCAB}
    write_rows(str(out_dir), synthetic_rows(n_rows, seq_len, seed, packed), SFT_COLUMNS, manifest)
    return str(out_dir)


def tiny_config(output_dir: Path, shard_dir: str, **overrides) -> dict:
    from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir

    cfg = {
        "output_dir": str(output_dir), "device": "cpu", "dtype": "fp32", "seed": 11,
        "model": dict(TINY_MODEL),
        "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "path": str(bundled_tokenizer_dir())},
        "dataset": {"shard_dir": shard_dir},
        "shuffle": True, "batch_size": 1, "epochs": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.01},
        "lr_scheduler": {"_component_": "mirotrain.training.get_cosine_schedule_with_warmup", "warmup_ratio": 0.1,
                         "min_lr_ratio": 0.1},
        "clip_grad_norm": 1.0, "compile": False, "enable_activation_checkpointing": False,
        "auto_resume": False, "log_every_n_steps": 1, "log_peak_memory_stats": False,
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_sft(config: Path, nproc: int = 1, env: dict | None = None, timeout: float = 240,
            overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``mirotrain sft`` as a user runs it: under torchrun for nproc > 1. Own session, so the fault hook's
    process-group kill never reaches pytest."""
    if nproc > 1:
        # --standalone: torchrun picks a free port itself (no race with other runs on the machine)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "mirotrain", "sft", "--config", str(config)]
    else:
        cmd = [sys.executable, "-m", "mirotrain", "sft", "--config", str(config)]
    cmd += list(overrides)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    return subprocess.run(cmd, env=full_env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def read_metrics(output_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_training(want_dir: Path, got_dir: Path, steps: int, exports: tuple[str, ...] = ("final",)) -> None:
    """Two runs' outputs bit for bit: each of ``steps`` steps' loss, grad norm and LR, and the named HF exports."""
    want, got = read_metrics(want_dir), read_metrics(got_dir)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    for name in exports:
        a, b = read_weights(Path(want_dir) / "hf" / name), read_weights(Path(got_dir) / "hf" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
