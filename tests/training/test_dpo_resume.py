"""Auto-resume for DPO, on the auto-resume tests' harness (tests/training/sft_helpers.py: configs, shards
writer conventions, metrics and weights readers): `mirotrain dpo` under torchrun (2 ranks, gloo) killed
with SIGKILL of its process group at three points — one right after an asynchronous save was launched —
and restarted with the same command each time reproduces the uninterrupted run bit for bit: losses,
grad norms, LRs, every DPO metric, the bco_pair running mean, and the final weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ports import free_port
from sft_helpers import REPO, VOCAB, assert_ok, read_metrics, read_weights, tiny_config, write_config

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH, EPOCHS, EVERY = 8, 2, 3
TOTAL = STEPS_PER_EPOCH * EPOCHS
COMPARED = ("loss", "grad_norm", "lr", "pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected", "loss/sigmoid", "loss/bco_pair", "loss/sft",
            "bco/delta")


def write_dpo_shards(out_dir: Path, n_rows: int, seq_len: int, seed: int) -> str:
    """Packed DPO rows of synthetic pairs (shared random prompt, two random answers) in the data package's layout."""
    from mirotrain.data.datasets import Encoded, EncodedPair
    from mirotrain.data.preference import DPO_COLUMNS, build_dpo_row
    from mirotrain.data.shards import write_rows

    rng = np.random.default_rng(seed)
    rows, pair_id = [], 0
    for _ in range(n_rows):
        pairs, used = [], 0
        while True:
            prompt = rng.integers(0, VOCAB, size=int(rng.integers(3, 10)))
            docs = []
            for _ in range(2):
                ids = np.concatenate([prompt, rng.integers(0, VOCAB, size=int(rng.integers(2, 8)))]).astype(np.int32)
                labels = np.full(len(ids), -100, dtype=np.int32)
                labels[len(prompt) - 1:-1] = ids[len(prompt):]
                docs.append(Encoded(ids, labels))
            pair = EncodedPair(*docs)
            if pairs and used + len(pair) > seq_len:
                break
            pairs.append((pair_id, pair))
            used += len(pair)
            pair_id += 1
        rows.append(build_dpo_row(pairs))
    manifest = {"kind": "dpo", "layout": "packed", "pad_id": 0, "packed_seq_len": seq_len, "vocab_size": VOCAB,
                "dataset_hash": f"synthetic-{seed}-{n_rows}-{seq_len}"}
    write_rows(str(out_dir), rows, dict(DPO_COLUMNS), manifest)
    return str(out_dir)


def run_dpo(config: Path, nproc: int = 2, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mirotrain dpo` under torchrun, in its own session (the fault hook kills its process group, not pytest)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "mirotrain", "dpo", "--config", str(config)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def _config(tmp: Path, shards: str, name: str) -> Path:
    cfg = tiny_config(tmp / name, shards, epochs=EPOCHS, auto_resume=True, checkpoint_steps_for_auto_resume=EVERY,
                      keep_last_n_checkpoints=2, max_steps_per_epoch=STEPS_PER_EPOCH,
                      loss_chunk_tokens=16, reference="precompute")
    cfg["loss"] = {"_component_": "mirotrain.modules.loss.DPOLoss", "beta": 0.1,
                   "loss_config": {"sigmoid": 1.0, "bco_pair": 0.5, "sft": 0.1}}
    return write_config(cfg, tmp / f"{name}.yaml")


def _fault(tmp: Path, step: int, n: int) -> dict:
    return {"MIROTRAIN_FAULT_AFTER_STEP": str(step), "MIROTRAIN_FAULT_MARKER": str(tmp / f"fault{n}.marker")}


def test_dpo_killed_three_times_resumes_bit_identically(tmp_path):
    shards = write_dpo_shards(tmp_path / "shards", n_rows=2 * STEPS_PER_EPOCH, seq_len=96, seed=5)
    clean = tmp_path / "clean"
    assert_ok(run_dpo(_config(tmp_path, shards, "clean")))

    cfg = _config(tmp_path, shards, "faulted")
    out = tmp_path / "faulted"
    # 1) killed after step 4 (the fault hook lets the async save of step 3 land first)
    p = run_dpo(cfg, env=_fault(tmp_path, 4, 1))
    assert p.returncode != 0 and (tmp_path / "fault1.marker").exists()
    # 2) restarted, then killed right after launching the async save of step 9: step_9 stays incomplete
    p = run_dpo(cfg, env=_fault(tmp_path, 9, 2))
    assert p.returncode != 0 and (tmp_path / "fault2.marker").exists()
    # 3) restarted (skipping the incomplete step_9, resuming from an earlier complete one), killed after 13
    p = run_dpo(cfg, env=_fault(tmp_path, 13, 3))
    log = p.stdout + p.stderr
    assert p.returncode != 0 and "Skipping step checkpoint" in log and "step_9" in log and "Resumed from" in log
    # 4) restarted once more: resumes (step 12 at the latest) and finishes
    p = run_dpo(cfg)
    assert_ok(p)
    assert "Resumed from" in p.stdout + p.stderr

    want, got = read_metrics(clean), read_metrics(out)
    assert sorted(got) == sorted(want) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        for key in COMPARED:
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    a, b = read_weights(clean / "hf" / "final"), read_weights(out / "hf" / "final")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
