"""The async-save stager: reused host buffers for model/optimizer, fresh copies for entries that change size."""

import math

import pytest
import torch
import torch.distributed as dist

from mirotrain.checkpoint import staging
from mirotrain.checkpoint.staging import ReusedBufferStager


@pytest.fixture
def single_process_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _state(step: int, extra_len: int) -> dict:
    return {
        "model": {"w": torch.full((4, 3), float(step)), "b": torch.arange(3.0) + step},
        "optim": {"w": {"exp_avg": torch.full((4, 3), -float(step)), "step": torch.tensor(float(step))}},
        "extra/train_state": torch.arange(extra_len, dtype=torch.uint8),
        "extra/rank0/rng": torch.full((extra_len + 1,), step, dtype=torch.uint8),
    }


def test_second_save_with_grown_entries_stages_the_new_values_into_the_same_buffers():
    stager = ReusedBufferStager(pin_memory=False)
    first = stager.stage(_state(1, 99))
    buffer_ptr = first["model"]["w"].data_ptr()
    live = _state(2, 100)  # an encoded entry grew by one byte: the failure of a fully cached stager
    second = stager.stage(live)
    assert second["model"]["w"].data_ptr() == buffer_ptr  # no new allocation for the bulk of the state
    for key in ("model", "optim"):
        torch.testing.assert_close(second[key], live[key], rtol=0, atol=0)
    assert torch.equal(second["extra/train_state"], live["extra/train_state"])
    assert torch.equal(second["extra/rank0/rng"], live["extra/rank0/rng"])
    live["model"]["w"].add_(1.0)  # training goes on: the staged copy must not change
    live["extra/rank0/rng"].zero_()
    assert torch.equal(second["model"]["w"], torch.full((4, 3), 2.0))
    assert int(second["extra/rank0/rng"][0]) == 2


def test_buffers_are_reallocated_when_the_optimizer_state_gains_entries():
    """A parameter that first gets optimizer state after the first save must not break the second save."""
    stager = ReusedBufferStager(pin_memory=False)
    first = _state(1, 10)
    first["optim"] = {}
    stager.stage(first)
    live = _state(2, 10)
    staged = stager.stage(live)
    torch.testing.assert_close(staged["optim"], live["optim"], rtol=0, atol=0)


def test_prepare_allocates_in_the_background_and_the_first_save_uses_those_buffers():
    stager = ReusedBufferStager(pin_memory=False)
    live = _state(3, 7)
    stager.prepare(live)
    staged = stager.stage(live)
    assert staged["model"]["w"].data_ptr() == stager._buffers.tree["model"]["w"].data_ptr()
    torch.testing.assert_close(staged["optim"], live["optim"], rtol=0, atol=0)


def test_every_tensor_lies_inside_one_chunk(monkeypatch):
    """One registration per chunk: a copy into a tensor straddling two registrations would not be pinned."""
    monkeypatch.setattr(staging, "CHUNK_BYTES", 256)  # padded sizes 64, 128, 64 | 448 | 64
    state = {"model": {f"w{i}": torch.randn(n) for i, n in enumerate((5, 20, 3, 100, 1))}}
    buffers = staging.HostBuffers(state, pin_memory=False)
    for (chunk, offset), (_, shape, dtype) in zip(buffers._places, buffers.layout):
        nbytes = math.prod(shape) * dtype.itemsize
        assert offset % staging.ALIGN_BYTES == 0
        assert offset + nbytes <= buffers._chunks[chunk].nbytes
    for name, staged in buffers.tree["model"].items():  # DCP's writer clones tensors with larger storages
        assert staged.untyped_storage().nbytes() == staged.nbytes, name
    assert [c.nbytes for c in buffers._chunks] == [256, 448, 64]  # a larger tensor gets a chunk of its own
    torch.testing.assert_close(buffers.fill(state), state, rtol=0, atol=0)


def test_dtensor_shards_stage_as_cpu_dtensors_with_the_same_placement(single_process_mesh):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    full = torch.arange(24.0).reshape(6, 4)
    live = {"model": {"w": distribute_tensor(full, single_process_mesh, [Shard(0)])}, "optim": {}}
    staged = ReusedBufferStager(pin_memory=False).stage(live)
    w = staged["model"]["w"]
    assert isinstance(w, DTensor) and w.placements == live["model"]["w"].placements and w.shape == (6, 4)
    assert torch.equal(w.to_local(), full) and w.to_local().data_ptr() != live["model"]["w"].to_local().data_ptr()


def test_a_chunk_outlives_every_staged_tensor_over_it():
    """The page lock is released when the chunk array dies: never while a staged tensor (e.g. one the DCP writer
    thread still reads) points into it."""
    import gc
    import weakref

    live = {"model": {"w": torch.randn(4, 3)}, "optim": {}}
    buffers = staging.HostBuffers(live, pin_memory=False)
    released = []
    weakref.finalize(buffers._chunks[0], released.append, True)
    staged = buffers.fill(live)["model"]["w"]
    del buffers
    gc.collect()
    assert not released and torch.equal(staged, live["model"]["w"])
    del staged
    gc.collect()
    assert released


def test_a_failed_background_allocation_surfaces_at_the_next_save(monkeypatch):
    def refuse(*args, **kwargs):
        raise MemoryError("no host memory")

    stager = ReusedBufferStager(pin_memory=False)
    monkeypatch.setattr(staging, "HostBuffers", refuse)
    stager.prepare(_state(1, 4))
    with pytest.raises(RuntimeError, match="allocating the host buffers") as info:
        stager.stage(_state(1, 4))
    assert isinstance(info.value.__cause__, MemoryError)
