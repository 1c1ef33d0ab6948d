"""Outputs where MiroTrain users look for them (`mirotrain sft`, one CPU process).

A 2-epoch run from a tiny -Base-like checkpoint (eos_token_id 151643, its own generation_config.json):
``output_dir/epoch_{N}/`` holds the HF export of epoch N as hard links to ``hf/epoch_N`` / ``hf/final``, loads
in transformers, and every export of the trainer keeps the base model's token ids and generation config.
An output_dir holding MiroTrain's own step checkpoints (``epoch_E/step_S``, DCP) is refused at auto-resume
with one line, and the run that line proposes trains.
"""

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_helpers import assert_ok, run_sft, tiny_config, write_config, write_shards  # noqa: E402

from mirotrain.checkpoint.layout import CheckpointInputError, mirotrain_step_dirs, resolve_checkpoint  # noqa: E402
from mirotrain.cli import main  # noqa: E402
from mirotrain.models.qwen3.tiny import TINY_ARGS, write_tiny_checkpoint  # noqa: E402
from mirotrain.training.export import EXPORT_MARK, HFExport, link_epoch_dir  # noqa: E402

BASE_IDS = {"bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643}  # a Qwen3-*-Base's
GENERATION = {"bos_token_id": 151643, "eos_token_id": 151643, "max_new_tokens": 2048, "do_sample": False}
# the embedded default's tiny Qwen3: the full vocabulary, so the -Base token ids are valid for transformers
MODEL = {"_component_": "mirotrain.models.qwen3.qwen3", **TINY_ARGS}


def _base_checkpoint(path: Path) -> Path:
    """A tiny random Qwen3 of the runs' shape, with a -Base model's token ids and generation config."""
    write_tiny_checkpoint(path, seed=3)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **BASE_IDS}))
    (path / "generation_config.json").write_text(json.dumps(GENERATION))
    return path


def _checkpointer(checkpoint_dir: Path | None) -> dict:
    return {"_component_": "torchtune.training.FullModelHFCheckpointer", "model_type": "QWEN3",
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch SFT run (2 steps per epoch) that started from the -Base-like checkpoint."""
    tmp = tmp_path_factory.mktemp("epochs")
    base = _base_checkpoint(tmp / "Qwen3-tiny-Base")
    shards = write_shards(tmp / "shards", n_rows=2, seq_len=64, seed=2)
    out = tmp / "run"
    config = write_config(tiny_config(out, shards, model=MODEL, epochs=2, checkpointer=_checkpointer(base)), tmp / "run.yaml")
    assert_ok(run_sft(config))
    return out


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(24).reshape(2, 12) * 997).logits


@pytest.mark.slow
def test_each_epoch_end_export_is_hard_linked_as_output_dir_epoch_n(run):
    for epoch_dir, export in ((run / "epoch_0", run / "hf" / "epoch_0"), (run / "epoch_1", run / "hf" / "final")):
        assert epoch_dir.is_dir() and not epoch_dir.is_symlink()
        names = sorted(p.name for p in export.iterdir())
        assert sorted(p.name for p in epoch_dir.iterdir()) == sorted([*names, EXPORT_MARK])
        assert "model.safetensors" in names
        for name in names:
            assert os.path.samefile(epoch_dir / name, export / name), name  # no extra disk
    assert not list(run.glob("epoch_*/step_*")) and not list(run.glob("epoch_*.tmp"))


@pytest.mark.slow
def test_output_dir_epoch_n_loads_in_transformers_as_the_export(run):
    last, first = _logits(run / "epoch_1"), _logits(run / "epoch_0")
    assert torch.equal(last, _logits(run / "hf" / "final"))
    assert torch.equal(first, _logits(run / "hf" / "epoch_0"))
    assert not torch.equal(first, last)  # epoch_0 is the first epoch's weights, not the final ones


@pytest.mark.slow
def test_the_trainers_export_keeps_the_base_models_token_ids_and_generation_config(run):
    from transformers import AutoConfig, GenerationConfig

    for export in (run / "hf" / "final", run / "hf" / "epoch_0", run / "epoch_1"):
        config = json.loads((export / "config.json").read_text())
        assert {k: config.get(k) for k in BASE_IDS} == BASE_IDS, export
        assert json.loads((export / "generation_config.json").read_text()) == GENERATION, export
    assert AutoConfig.from_pretrained(run / "epoch_1").eos_token_id == 151643
    assert GenerationConfig.from_pretrained(run / "epoch_1").eos_token_id == 151643


def test_an_epoch_dir_the_trainer_did_not_write_is_left_alone(tmp_path):
    """MiroTrain wrote its epoch weights (and step checkpoints) to output_dir/epoch_E/: an export never touches
    them; its own earlier epoch_E/ (marked) is replaced whole."""
    src = tmp_path / "hf" / "final"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"new")
    (src / "config.json").write_text("{}")
    theirs = tmp_path / "epoch_0"
    (theirs / "step_5").mkdir(parents=True)
    (theirs / "step_5" / ".metadata").write_bytes(b"m")
    (theirs / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (theirs / "config.json").write_text('{"theirs": 1}')
    link_epoch_dir(src, theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json", "model-00001-of-00002.safetensors", "step_5"]
    assert (theirs / "config.json").read_text() == '{"theirs": 1}'
    ours = tmp_path / "epoch_1"
    link_epoch_dir(src, ours)
    assert sorted(p.name for p in ours.iterdir()) == [EXPORT_MARK, "config.json", "model.safetensors"]
    assert os.path.samefile(ours / "model.safetensors", src / "model.safetensors")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").write_bytes(b"newer")  # a re-export writes new files
    link_epoch_dir(src, ours)
    assert (ours / "model.safetensors").read_bytes() == b"newer"
    assert not (tmp_path / "epoch_1.tmp").exists() and not (tmp_path / "epoch_1.old").exists()


def _mirotrain_step_checkpoint(path: Path) -> None:
    """A step checkpoint as MiroTrain's StepCheckpointClient wrote it: DCP with its parameter names."""
    state = {"model": {"tok_embeddings.weight": torch.zeros(16, 8), "layers.0.attn.q_proj.weight": torch.zeros(8, 8)},
             "seed": torch.tensor(11), "global_step": torch.tensor(6), "dataloader-0": torch.zeros(4)}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process writes it, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    assert (path / ".metadata").is_file()


@pytest.fixture
def mirotrain_output_dir(tmp_path):
    """MiroTrain's output_dir after 1.5 epochs: epoch_0/ with its epoch-end HF weights beside step_3, and the
    newest step checkpoint epoch_1/step_6."""
    out = tmp_path / "mirotrain_run"
    write_tiny_checkpoint(out / "epoch_0", seed=4)
    _mirotrain_step_checkpoint(out / "epoch_0" / "step_3")
    _mirotrain_step_checkpoint(out / "epoch_1" / "step_6")
    return out


@pytest.fixture
def _fresh_log_handler():
    """The in-process run logs to the stderr of its own test (the trainer adds its handler once per process)."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_mirotrain", False)]:
        root.removeHandler(handler)


def test_auto_resume_refuses_mirotrain_step_checkpoints_in_one_line(tmp_path, mirotrain_output_dir, capsys,
                                                                    _fresh_log_handler):
    shards = write_shards(tmp_path / "shards", n_rows=2, seq_len=64, seed=2)
    out = mirotrain_output_dir
    config = write_config(tiny_config(out, shards, auto_resume=True), tmp_path / "resume.yaml")
    assert main(["sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mirotrain sft: ")]
    assert lines == [
        f"mirotrain sft: {out}/epoch_1/step_6 is a MiroTrain step checkpoint (epoch_E/step_S, DCP), which this "
        f"trainer cannot resume or convert: its model and optimizer state use MiroTrain's parameter names and its "
        f"data-loader position does not carry over. Start a new run from the HF weights MiroTrain saved at the end "
        f"of epoch_0: checkpointer.checkpoint_dir={out}/epoch_0 output_dir=<a new directory> (epochs count from "
        f"there). To train from the start instead, use a new output_dir."]
    assert not (out / "checkpoints").exists() and not (out / "hf").exists()  # nothing trained


def test_resume_from_checkpoint_reads_as_auto_resume_and_refuses_too(tmp_path, mirotrain_output_dir, capsys,
                                                                      _fresh_log_handler):
    shards = write_shards(tmp_path / "shards", n_rows=2, seq_len=64, seed=2)
    config = write_config(tiny_config(mirotrain_output_dir, shards, resume_from_checkpoint=True),
                          tmp_path / "resume.yaml")
    assert main(["sft", "--config", str(config)]) == 2
    assert "epoch_1/step_6 is a MiroTrain step checkpoint" in capsys.readouterr().err


def test_convert_refuses_mirotrain_step_checkpoints_with_the_same_line(mirotrain_output_dir):
    out = mirotrain_output_dir
    for named, newest in ((out / "epoch_0" / "step_3", out / "epoch_0" / "step_3"),
                          (out / "epoch_1", out / "epoch_1" / "step_6"), (out, out / "epoch_1" / "step_6")):
        with pytest.raises(CheckpointInputError) as refused:
            resolve_checkpoint(named)
        assert str(refused.value).startswith(f"{newest} is a MiroTrain step checkpoint")
        assert f"checkpointer.checkpoint_dir={out / 'epoch_0'} " in str(refused.value)


def test_an_export_name_is_final_or_an_epoch_dir_name(tmp_path):
    """Export names and output_dir's epoch directories share one spelling (checkpoint/layout.py:
    ``epoch_dir_name`` writes it, ``EPOCH_DIR_RE`` reads it)."""
    export = HFExport(tmp_path, None, None, "5GB", torch.float32, every_epoch=True, epochs=3)
    assert (export.epoch_of("epoch_1"), export.epoch_of("final")) == (1, 2)
    for name in ("epoch_", "epoch_1/", "step_1"):
        with pytest.raises(ValueError, match=f"HF export name {name!r}: expected 'final' or 'epoch_<k>'"):
            export.epoch_of(name)


def test_our_epoch_exports_are_never_taken_for_mirotrain_step_checkpoints(tmp_path):
    out = tmp_path / "run"
    write_tiny_checkpoint(out / "epoch_0", seed=4)  # what output_dir/epoch_0 holds after our run
    assert mirotrain_step_dirs(out) == []
    with pytest.raises(CheckpointInputError, match="it has no checkpoints/ directory"):
        resolve_checkpoint(out)


@pytest.mark.slow
def test_the_run_the_refusal_proposes_trains_from_mirotrain_epoch_weights(tmp_path, mirotrain_output_dir):
    shards = write_shards(tmp_path / "shards", n_rows=2, seq_len=64, seed=2)
    config = write_config(tiny_config(mirotrain_output_dir, shards, model=MODEL, auto_resume=True,
                                      checkpointer=_checkpointer(None)), tmp_path / "resume.yaml")
    refused = run_sft(config)
    assert refused.returncode == 2, refused.stderr[-3000:]
    proposed = re.search(r"checkpointer\.checkpoint_dir=(\S+) output_dir=<a new directory>", refused.stderr)
    new_out = tmp_path / "continued"
    p = run_sft(config, overrides=(f"checkpointer.checkpoint_dir={proposed.group(1)}", f"output_dir={new_out}"))
    assert_ok(p)
    assert f"Loaded base weights from {mirotrain_output_dir / 'epoch_0'}" in p.stderr
    assert (new_out / "epoch_0" / "model.safetensors").is_file()
    assert (mirotrain_output_dir / "epoch_1" / "step_6" / ".metadata").is_file()  # MiroTrain's files untouched
