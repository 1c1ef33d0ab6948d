"""Async saves fall back to synchronous ones where the host copies would not fit in the node's memory."""

import logging

import pytest
import torch
import torch.distributed as dist

from mirotrain.checkpoint import step_checkpointer
from mirotrain.checkpoint.host_memory import available_host_bytes, staged_bytes
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
