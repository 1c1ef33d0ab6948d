"""Step-checkpoint bookkeeping on disk: COMPLETE manifest, integrity checks, retention; the JSON codec."""

import json

import numpy as np
import torch

from mirotrain.checkpoint.codec import decode, encode
from mirotrain.checkpoint.layout import MARKER, apply_retention, check_step_dir, list_step_dirs, newest_valid, write_marker


def _fake_checkpoint(root, step, complete=True):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step}))
    (d / "__0_0.distcp").write_bytes(b"x" * 100)
    (d / ".metadata").write_bytes(b"m")
    if complete:
        write_marker(d)
    return d


def test_retention_keeps_exactly_k_complete_and_never_counts_incomplete(tmp_path):
    for step in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 12, complete=False)  # a crashed save between complete ones
    _fake_checkpoint(tmp_path, 25, complete=False)  # the save in flight
    removed = apply_retention(tmp_path, keep_last_n=2, newest_complete_step=20)
    assert sorted(p.name for p in removed) == ["step_10", "step_12", "step_5"]
    assert [d.step for d in list_step_dirs(tmp_path)] == [15, 20, 25]  # the newer in-flight one is untouched
    assert apply_retention(tmp_path, keep_last_n=0, newest_complete_step=20) == [tmp_path / "step_15"]
    assert (tmp_path / "step_20" / MARKER).is_file()  # the newest complete one is never deleted


def test_integrity_checks_name_the_problem(tmp_path):
    d = _fake_checkpoint(tmp_path, 1, complete=False)
    assert "COMPLETE" in check_step_dir(d)
    write_marker(d)
    (d / "__0_0.distcp").write_bytes(b"x" * 50)
    assert "50 bytes, expected 100" in check_step_dir(d)
    (d / "__0_0.distcp").unlink()
    assert "missing" in check_step_dir(d)


def test_newest_valid_skips_and_removes_damaged_newer_ones(tmp_path, caplog):
    import torch.distributed.checkpoint as dcp

    good = tmp_path / "step_4"
    dcp.save({"w": torch.arange(10.0)}, checkpoint_id=str(good), no_dist=True)
    (good / "meta.json").write_text("{}")
    write_marker(good)
    bad = _fake_checkpoint(tmp_path, 8)
    (bad / "__0_0.distcp").unlink()
    found = newest_valid(tmp_path, remove_invalid_newer=True)
    assert found.step == 4 and not bad.exists()
    assert "step_8" in caplog.text and "missing" in caplog.text


def test_codec_round_trips_state_dicts_exactly():
    import random

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "lr": [0.1 / 3, 1e-300], "nested": {"epoch": 2, 7: (1, "a")}, "none": None, "flag": True}
    back = decode(encode(state))
    assert back["python"] == state["python"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert torch.equal(back["torch"], state["torch"]) and back["torch"].dtype == torch.uint8
    assert back["lr"] == state["lr"] and back["nested"] == {"epoch": 2, 7: (1, "a")}
    assert back["none"] is None and back["flag"] is True
