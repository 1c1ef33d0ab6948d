"""MoE through the trainer: expert parallelism (experts sharded over 2 ranks, all-to-all dispatch, expert FSDP
unit dividing by the full DP size) trains exactly like EP=1 on the same 2 ranks, and Ulysses SP=2 exactly like
one process; router aux loss and expert load logged."""

import numpy as np
import pytest

from sft_helpers import (TINY_MOE, assert_ok, read_metrics, read_weights, run_sft, tiny_config, write_config,
                         write_shards)

pytestmark = pytest.mark.slow  # `mirotrain sft` under torchrun


def test_expert_parallel_equals_ep1(tmp_path):
    shards = write_shards(tmp_path / "shards", n_rows=8, seq_len=64, seed=1)
    for name, ep in (("ep1", 1), ("ep2", 2)):
        cfg = tiny_config(tmp_path / name, shards, seed=5, moe_expert_parallel_size=ep)
        cfg["model"] = dict(TINY_MOE)
        assert_ok(run_sft(write_config(cfg, tmp_path / f"{name}.yaml"), nproc=2))
    m1, m2 = read_metrics(tmp_path / "ep1"), read_metrics(tmp_path / "ep2")
    assert sorted(m1) == sorted(m2) == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "moe/aux_loss"):
        np.testing.assert_allclose([m1[s][key] for s in m1], [m2[s][key] for s in m1], rtol=0, atol=1e-5, err_msg=key)
    w1, w2 = read_weights(tmp_path / "ep1" / "hf" / "final"), read_weights(tmp_path / "ep2" / "hf" / "final")
    assert w1.keys() == w2.keys() and any(".experts." in k for k in w1)
    for key in w1:
        assert (w1[key] - w2[key]).abs().max().item() <= 1e-4, key


def test_sequence_parallel_equals_single_rank(tmp_path):
    """Ulysses SP=2 (each rank routes half of every packed row; router statistics combined over dp x sp) trains
    like one process: loss, gradient norm, aux loss, the worst expert load and the final weights."""
    shards = write_shards(tmp_path / "shards", n_rows=6, seq_len=64, seed=2)  # rows of 32-64 tokens padded to 64
    runs = {}
    for name, sp in (("sp1", 1), ("sp2", 2)):
        cfg = tiny_config(tmp_path / name, shards, seed=5, ulysses_sequence_parallel_size=sp)
        cfg["model"] = dict(TINY_MOE)
        assert_ok(run_sft(write_config(cfg, tmp_path / f"{name}.yaml"), nproc=sp))
        runs[name] = read_metrics(tmp_path / name)
    m1, m2 = runs["sp1"], runs["sp2"]
    assert sorted(m1) == sorted(m2) == list(range(1, 7))
    for key in ("loss", "grad_norm", "moe/aux_loss", "moe/max_over_mean_load"):
        np.testing.assert_allclose([m1[s][key] for s in m1], [m2[s][key] for s in m1], rtol=0, atol=1e-5, err_msg=key)
    w1, w2 = read_weights(tmp_path / "sp1" / "hf" / "final"), read_weights(tmp_path / "sp2" / "hf" / "final")
    assert w1.keys() == w2.keys()
    for key in w1:
        assert (w1[key] - w2[key]).abs().max().item() <= 1e-4, key
