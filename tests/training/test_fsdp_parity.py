"""2-process FSDP (torchrun, gloo) equals 1 process on the same global batch: losses, grad norms and final
weights within 1e-5. Rank r of R reads rows r, r+R, ... of the epoch order, so 1 rank accumulating 2 micro-
batches sees exactly the rows 2 ranks see in one micro-batch each."""

import numpy as np

from sft_helpers import assert_ok, read_metrics, read_weights, run_sft, tiny_config, write_config, write_shards


def test_two_ranks_equal_one_rank(tmp_path):
    shards = write_shards(tmp_path / "shards", n_rows=16, seq_len=64, seed=1)
    one = write_config(tiny_config(tmp_path / "one", shards, gradient_accumulation_steps=2, seed=5), tmp_path / "one.yaml")
    two = write_config(tiny_config(tmp_path / "two", shards, gradient_accumulation_steps=1, seed=5), tmp_path / "two.yaml")
    assert_ok(run_sft(one, nproc=1))
    assert_ok(run_sft(two, nproc=2))
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(m1) == sorted(m2) == list(range(1, 9))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([m1[s][key] for s in m1], [m2[s][key] for s in m1], rtol=0, atol=1e-5, err_msg=key)
    w1, w2 = read_weights(tmp_path / "one" / "hf" / "final"), read_weights(tmp_path / "two" / "hf" / "final")
    assert w1.keys() == w2.keys()
    for key in w1:
        assert (w1[key] - w2[key]).abs().max().item() <= 1e-5, key
    summary = (tmp_path / "two" / "summary.json").read_text()
    assert '"steps": 8' in summary and '"hf_dir"' in summary
