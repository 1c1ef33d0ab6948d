"""Auto-resume with ``master_weights: bf16``: `mirotrain sft` under torchrun (2 ranks, gloo, bf16 compute on CPU),
SIGKILLed after step 6 and restarted from its step-4 checkpoint, must reproduce the uninterrupted run bit for
bit. That needs the bf16 moments and the compensation buffer in the step checkpoint (sharded, like the weights)
and each rank's RNG state restored, since the second moment's stochastic rounding draws from it. With
``optimizer_state_offload`` in the killed run only (moments and compensation in host tensors, DTensors like the
weights' shards, streamed through the update: mirotrain/optim/host_state.py) it must equal the uninterrupted run
that keeps them beside the weights: offloading changes no bit, and its state survives the checkpoint. With the
optimizer step compiled (``compile: {optimizer_step: true}``, Inductor's C++ kernels on CPU) in both runs, the
killed run compiles again after the restart: the kernel's stochastic rounding takes its seed from the restored
default generator, so the resumed run is still bitwise the uninterrupted one."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from sft_helpers import assert_ok, read_metrics, read_weights, run_sft, tiny_config, write_config, write_shards  # noqa: E402

pytestmark = pytest.mark.slow  # `mirotrain sft` under torchrun, killed and restarted

STEPS, EVERY, KILL_AFTER = 12, 4, 6


def _config(tmp: Path, shards: str, name: str, **keys) -> Path:
    cfg = tiny_config(tmp / name, shards, auto_resume=True, checkpoint_steps_for_auto_resume=EVERY, seed=5,
                      dtype="bf16", master_weights="bf16", **keys)
    return write_config(cfg, tmp / f"{name}.yaml")


COMPILED = {"compile": {"optimizer_step": True}}


# (keys of both runs, keys of the killed run only)
@pytest.mark.parametrize("shared_keys, faulted_keys", [({}, {}), ({}, {"optimizer_state_offload": True}),
                                                      (COMPILED, {})], ids=["resident", "offloaded", "compiled"])
def test_bf16_mode_killed_and_resumed_equals_uninterrupted(tmp_path, shared_keys, faulted_keys):
    from torch.distributed.checkpoint import FileSystemReader

    shards = write_shards(tmp_path / "shards", n_rows=2 * STEPS, seq_len=64, seed=3)
    # each case compiles into its own cache, so its generated kernels show that the compiled step ran
    inductor_cache = tmp_path / "inductor"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    clean = run_sft(_config(tmp_path, shards, "clean", **shared_keys), nproc=2, env=env)
    assert_ok(clean)
    assert any(inductor_cache.rglob("*.py")) == bool(shared_keys)

    faulted = _config(tmp_path, shards, "faulted", **shared_keys, **faulted_keys)
    marker = tmp_path / "fault.marker"
    first = run_sft(faulted, nproc=2, env={**env, "MIROTRAIN_FAULT_AFTER_STEP": str(KILL_AFTER),
                                           "MIROTRAIN_FAULT_MARKER": str(marker)})
    assert first.returncode != 0 and marker.exists(), first.stderr[-3000:]
    ckpt = tmp_path / "faulted" / "checkpoints" / f"step_{EVERY}"
    stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    compensation = [k for k in stored if k.endswith(".compensation")]
    assert "optim.layers.0.attention.wq.weight.compensation" in compensation
    assert stored["optim.layers.0.attention.wq.weight.exp_avg_sq"].properties.dtype == torch.bfloat16

    resumed = run_sft(faulted, nproc=2, env=env)
    assert_ok(resumed)
    offloaded = "optimizer_state_offload" in faulted_keys
    assert ("optimizer_state_offload: the AdamW moments" in resumed.stdout + resumed.stderr) == offloaded
    assert f"step_{EVERY}: step {EVERY}" in resumed.stdout + resumed.stderr

    want, got = read_metrics(tmp_path / "clean"), read_metrics(tmp_path / "faulted")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    a, b = read_weights(tmp_path / "clean" / "hf" / "final"), read_weights(tmp_path / "faulted" / "hf" / "final")
    assert a.keys() == b.keys() and all(t.dtype == torch.bfloat16 for t in a.values())
    for key in a:
        assert torch.equal(a[key], b[key]), key
