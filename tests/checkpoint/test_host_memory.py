"""Async saves fall back to synchronous ones where the host copies would not fit in the node's memory; a checkpoint
directory on tmpfs counts as host memory, and saves are refused where not even its files fit."""

import logging
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mirotrain.checkpoint import step_checkpointer
from mirotrain.checkpoint.host_memory import (
    MEMORY_FS_TYPES, HostMemoryError, available_host_bytes, filesystem_type, plan_host_memory, staged_bytes,
)
from mirotrain.checkpoint.layout import MARKER
from mirotrain.checkpoint.step_checkpointer import StepCheckpointer


def test_available_memory_is_the_lower_of_meminfo_and_the_cgroup_headroom(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000000 kB\nMemAvailable:     500000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_host_bytes(meminfo, cgroup) == 500000 * 1024  # no cgroup files: the node's figure
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert available_host_bytes(meminfo, cgroup) == 500000 * 1024  # "max": no container limit
    (cgroup / "memory.max").write_text(str(300 * 2**20))
    (cgroup / "memory.current").write_text(str(100 * 2**20))
    assert available_host_bytes(meminfo, cgroup) == 200 * 2**20
    assert available_host_bytes(tmp_path / "missing", tmp_path / "none") is None


def test_staged_bytes_counts_only_the_named_entries():
    state = {"model": {"w": torch.zeros(10, 4)}, "optim": {"w": {"exp_avg": torch.zeros(10, 4, dtype=torch.bfloat16),
                                                                    "step": torch.tensor(1.0)}},
             "extra/train_state": torch.zeros(1000, dtype=torch.uint8)}
    assert staged_bytes(state, ("model", "optim")) == 160 + 80 + 4


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("available,stays_async", [(1 << 40, True), (1000, False)])
def test_first_save_switches_to_synchronous_when_host_memory_is_short(tmp_path, monkeypatch, caplog,
                                                                      single_process_group, available, stays_async):
    monkeypatch.setattr(step_checkpointer, "available_host_bytes", lambda: available)
    ckpt = StepCheckpointer(tmp_path / "checkpoints", keep_last_n=2, async_save=True)
    state = {"model": {"w": torch.arange(1000.0)}, "optim": {}, "extra/train_state": torch.zeros(3, dtype=torch.uint8)}
    with caplog.at_level(logging.WARNING, logger=step_checkpointer.__name__):
        ckpt.save(1, state, {"step": 1})
        ckpt.save(2, state, {"step": 2})
        ckpt.close()
    assert ckpt.async_save is stays_async
    assert ("Saving step checkpoints synchronously" in caplog.text) is not stays_async
    for step in (1, 2):
        assert (tmp_path / "checkpoints" / f"step_{step}" / MARKER).is_file()


@pytest.fixture
def fs(tmp_path):
    """A mount table over directories of tmp_path (a disk root, a tmpfs, a ramfs with a space in its name and
    an xfs mounted inside it); returns (root, mounts file)."""
    root = tmp_path / "root"
    for d in ("shm", "ram disk/data", "disk"):
        (root / d).mkdir(parents=True)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda {tmp_path} ext4 rw 0 0\n"
                      f"tmpfs {root}/shm tmpfs rw,size=24684096k 0 0\n"
                      f"none {root}/ram\\040disk ramfs rw 0 0\n"
                      f"/dev/vdb {root}/ram\\040disk/data xfs rw 0 0\n")
    return root, mounts


@pytest.mark.parametrize("path,fs_type", [
    ("shm/run/checkpoints", "tmpfs"),      # not created yet: its nearest existing parent decides
    ("shmem/checkpoints", "ext4"),         # a sibling with the same prefix is not inside shm
    ("ram disk/ckpt", "ramfs"),            # /proc/mounts escapes the space as \040
    ("ram disk/data/ckpt", "xfs"),         # the longest mount point wins
])
def test_filesystem_type_is_the_mount_of_the_nearest_existing_parent(fs, path, fs_type):
    root, mounts = fs
    assert filesystem_type(root / path, mounts) == fs_type


@pytest.mark.skipif(filesystem_type("/dev/shm") != "tmpfs", reason="/dev/shm is not a tmpfs here")
def test_dev_shm_is_detected_as_memory_on_this_host(tmp_path):
    plan = plan_host_memory("/dev/shm/mirotrain-test-absent/checkpoints", staging=10, checkpoint=100,
                            keep_last_n=2, available=10**6)
    assert plan.in_memory and plan.checkpoints == 300
    assert plan_host_memory(tmp_path, staging=10, checkpoint=100, keep_last_n=2, available=10**6).checkpoints == (
        300 if filesystem_type(tmp_path) in MEMORY_FS_TYPES else 0)


GIB = 2**30


@pytest.mark.parametrize("directory,async_requested,available_gib,mode", [
    # Qwen3-8B on a 2×H200 node (256 GB): 92 GiB staging, 92 GiB per checkpoint, keep 2
    ("disk/ckpt", True, 240, "async"),     # on disk: only the staging buffers count (92 <= 192)
    ("shm/ckpt", True, 600, "async"),      # 92 + 3 × 92 = 368 <= 480
    ("shm/ckpt", True, 400, "sync"),       # 368 > 320, but the files alone (276) fit
    ("shm/ckpt", True, 240, "refuse"),     # 276 > 192: not even synchronous saves fit
    ("shm/ckpt", False, 400, "sync"),
    ("shm/ckpt", False, 240, "refuse"),
    ("shm/ckpt", True, None, "async"),     # unknown memory: nothing is refused
])
def test_save_mode_counts_tmpfs_checkpoints_as_host_memory(fs, directory, async_requested, available_gib, mode):
    root, mounts = fs
    plan = plan_host_memory(root / directory, staging=92 * GIB, checkpoint=92 * GIB, keep_last_n=2,
                            available=None if available_gib is None else available_gib * GIB, mounts=mounts)
    assert plan.mode(async_requested) == mode


def test_refusal_names_the_directory_and_the_numbers(fs):
    root, mounts = fs
    plan = plan_host_memory(root / "shm/ckpt", staging=92 * GIB, checkpoint=92 * GIB, keep_last_n=2,
                            available=240 * GIB, mounts=mounts)
    assert plan.refusal() == (f"step checkpoints in {root}/shm/ckpt (tmpfs: files held in host memory) would take "
                              "~276 GiB of this node's memory (the kept checkpoints and the one being written), above "
                              "80% of the 240 GiB available; put output_dir on a disk, lower keep_last_n_checkpoints "
                              "or use more nodes")


def test_checkpoints_already_in_a_tmpfs_directory_are_not_counted_twice(tmp_path):
    """Files already there are in the kernel's used memory: only what is still to come counts, and at least
    the checkpoint being written."""
    root = tmp_path / "checkpoints"
    (root / "step_10").mkdir(parents=True)
    (root / "step_10" / "__0_0.distcp").write_bytes(b"x" * 250)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"tmpfs {tmp_path} tmpfs rw 0 0\n")
    assert plan_host_memory(root, staging=0, checkpoint=100, keep_last_n=2, available=None, mounts=mounts).checkpoints == 100
    assert plan_host_memory(root, staging=0, checkpoint=100, keep_last_n=4, available=None, mounts=mounts).checkpoints == 250


@pytest.mark.skipif(filesystem_type("/dev/shm") != "tmpfs", reason="/dev/shm is not a tmpfs here")
@pytest.mark.parametrize("available,outcome", [(1 << 40, "async"), (10_000, "sync"), (5_000, "refuse")])
def test_step_checkpointer_on_dev_shm_counts_its_files(monkeypatch, caplog, single_process_group, available, outcome):
    """4000-byte state, keep 1: 8000 bytes of files to come in /dev/shm, plus 4000 of staging buffers."""
    monkeypatch.setattr(step_checkpointer, "available_host_bytes", lambda: available)
    root = Path(tempfile.mkdtemp(prefix="mirotrain-test-", dir="/dev/shm")) / "checkpoints"
    try:
        ckpt = StepCheckpointer(root, keep_last_n=1, async_save=True)
        state = {"model": {"w": torch.arange(1000.0)}, "optim": {}, "extra/train_state": torch.zeros(3, dtype=torch.uint8)}
        if outcome == "refuse":
            with pytest.raises(HostMemoryError, match=f"step checkpoints in {root} \\(tmpfs"):
                ckpt.save(1, state, {"step": 1})
            assert not (root / "step_1").exists()
            return
        with caplog.at_level(logging.WARNING, logger=step_checkpointer.__name__):
            ckpt.save(1, state, {"step": 1})
            ckpt.close()
        assert ckpt.async_save is (outcome == "async")
        assert ("checkpoint files in " + str(root)) in caplog.text if outcome == "sync" else caplog.text == ""
        assert (root / "step_1" / MARKER).is_file()
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
