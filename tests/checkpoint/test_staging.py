"""The async-save stager: reused host buffers for model/optimizer, fresh copies for entries that change size."""

import torch

from mirotrain.checkpoint.staging import ReusedBufferStager


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
