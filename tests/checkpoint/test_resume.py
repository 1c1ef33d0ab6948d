"""Auto-resume end to end: `mirotrain sft` under torchrun (2 ranks, gloo), killed with SIGKILL of every worker's
process group at three points — one while an asynchronous save is in flight — and restarted with the same
command each time, must reproduce the uninterrupted run bit for bit (losses, grad norms, LRs, final weights).
Damaged newest checkpoints (a deleted file, a truncated file) are skipped for the previous one.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from sft_helpers import assert_ok, read_metrics, read_weights, run_sft, tiny_config, write_config, write_shards  # noqa: E402

pytestmark = pytest.mark.slow  # `mirotrain sft` under torchrun, killed and restarted

STEPS_PER_EPOCH, EPOCHS, EVERY, KEEP = 20, 2, 5, 2
TOTAL = STEPS_PER_EPOCH * EPOCHS


def _config(tmp: Path, shards: str, name: str, seed: int | None) -> Path:
    cfg = tiny_config(tmp / name, shards, epochs=EPOCHS, auto_resume=True, checkpoint_steps_for_auto_resume=EVERY,
                      keep_last_n_checkpoints=KEEP, seed=seed)
    return write_config(cfg, tmp / f"{name}.yaml")


def _fault(tmp: Path, step: int, n: int) -> dict:
    return {"MIROTRAIN_FAULT_AFTER_STEP": str(step), "MIROTRAIN_FAULT_MARKER": str(tmp / f"fault{n}.marker")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The faulted run starts first with ``seed: null`` (a seed is drawn, logged and stored; every restart must
    keep it), is killed after step 12; the uninterrupted run then uses the seed it drew."""
    tmp = tmp_path_factory.mktemp("resume")
    shards = write_shards(tmp / "shards", n_rows=2 * STEPS_PER_EPOCH, seq_len=64, seed=3)
    first = run_sft(_config(tmp, shards, "faulted", None), nproc=2, env=_fault(tmp, 12, 1))
    assert first.returncode != 0 and (tmp / "fault1.marker").exists(), first.stderr[-3000:]
    seed = json.loads((tmp / "faulted" / "checkpoints" / "step_5" / "meta.json").read_text())["seed"]
    assert f"drew seed {seed}" in first.stdout + first.stderr
    clean = run_sft(_config(tmp, shards, "clean", seed), nproc=2)
    assert_ok(clean)
    return {"tmp": tmp, "shards": shards, "clean": tmp / "clean", "clean_log": clean.stdout + clean.stderr}


def test_killed_three_times_resumes_bit_identically(runs):
    tmp, clean = runs["tmp"], runs["clean"]
    cfg = tmp / "faulted.yaml"
    out = tmp / "faulted"
    ckpts = out / "checkpoints"
    assert "Step-based checkpoint is saved asynchronously to" in runs["clean_log"]

    # 1) (in the fixture) killed after step 12; a file of the newest checkpoint (step_10) is deleted -> step_5
    assert sorted(d.name for d in ckpts.iterdir()) == ["step_10", "step_5"]
    next(f for f in (ckpts / "step_10").glob("*.distcp")).unlink()
    p = run_sft(cfg, nproc=2, env={**_fault(tmp, 20, 2)})
    log = p.stdout + p.stderr
    assert "Skipping step checkpoint" in log and "step_10" in log
    assert "Resumed from" in log and "step_5: step 5" in log

    # 2) that restart was killed right after launching the async save of step 20 (also the last step of
    #    epoch 0): step_20 exists but is not COMPLETE -> resume from step_15
    assert p.returncode != 0
    assert (ckpts / "step_20").is_dir() and not (ckpts / "step_20" / "COMPLETE").exists()
    p = run_sft(cfg, nproc=2, env=_fault(tmp, 33, 3))
    log = p.stdout + p.stderr
    assert p.returncode != 0 and "step_15: step 15" in log

    # 3) killed after step 33; then a file of the newest checkpoint (step_30) is truncated -> resume from 25
    victim = max((ckpts / "step_30").glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    p = run_sft(cfg, nproc=2)
    assert_ok(p)
    log = p.stdout + p.stderr
    assert "truncated" in log or "bytes, expected" in log
    assert "step_25: step 25" in log

    want, got = read_metrics(clean), read_metrics(out)
    assert sorted(got) == list(range(1, TOTAL + 1)) == sorted(want)
    for step in range(1, TOTAL + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    for name in ("final", "epoch_0"):
        a, b = read_weights(clean / "hf" / name), read_weights(out / "hf" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # retention: exactly KEEP complete checkpoints, the newest ones, nothing incomplete left behind
    assert sorted(d.name for d in ckpts.iterdir()) == [f"step_{TOTAL - EVERY}", f"step_{TOTAL}"]
    assert all((d / "COMPLETE").is_file() for d in ckpts.iterdir())


def test_resume_on_a_different_world_size_reshards_model_and_optimizer(runs, tmp_path):
    """2-rank checkpoint -> 1 rank: weights, optimizer moments, schedule and counters come back exactly;
    the data position restarts the epoch (per-rank positions do not map onto a new sharding)."""
    from torch.distributed.checkpoint import FileSystemReader
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from mirotrain.config import load_config
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.sft import SFTTrainer

    out = tmp_path / "one_rank"
    shutil.copytree(runs["clean"] / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / f"step_{TOTAL}")  # resume from step 35, mid epoch 1
    step_dir = out / "checkpoints" / f"step_{TOTAL - EVERY}"
    cfg = load_config(runs["tmp"] / "clean.yaml", [f"output_dir={out}"])
    try:
        trainer = SFTTrainer(cfg)
        assert trainer.state.step == TOTAL - EVERY and trainer.state.epoch == 1 and trainer.state.step_in_epoch == 0
        assert trainer.lr_scheduler.last_epoch == TOTAL - EVERY
        model_sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in trainer.model.state_dict().items()}
        stored = {k: torch.empty_like(v) for k, v in model_sd.items()}
        dcp.load({"model": stored}, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
        for key in model_sd:
            assert torch.equal(model_sd[key], stored[key]), key
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim = get_optimizer_state_dict(trainer.model, trainer.optimizer)["state"]
        name = "layers.0.attention.wq.weight"
        exp_avg = optim[name]["exp_avg"]
        exp_avg = exp_avg.full_tensor() if isinstance(exp_avg, DTensor) else exp_avg
        ref = {"exp_avg": torch.empty_like(exp_avg)}
        dcp.load({"optim": {name: ref}}, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
        assert torch.equal(exp_avg, ref["exp_avg"])
        trainer.close()
    finally:
        destroy_distributed()


def test_convert_output_loads_in_transformers_with_our_logits(runs, tmp_path):
    """`mirotrain convert` of the last step checkpoint == the run's own final export, and transformers'
    logits on it equal ours."""
    from transformers import AutoModelForCausalLM

    from mirotrain.commands.convert import main as convert_main
    from mirotrain.models import from_pretrained

    clean = runs["clean"]
    out = tmp_path / "hf"
    assert convert_main(["--checkpoint", str(clean / "checkpoints" / f"step_{TOTAL}"), "--output", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    converted, exported = read_weights(out), read_weights(clean / "hf" / "final")
    assert converted.keys() == exported.keys()
    for key in converted:
        assert torch.equal(converted[key], exported[key]), key
    ours = from_pretrained(clean / "hf" / "final").eval()
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-5
