"""Host tensors of offloaded optimizer state (mirotrain/optim/host_state.py): exactly their own bytes (DCP clones
a tensor whose storage is larger, and torch's pinned allocator would round every block up to a power of two),
zero, in the requested shape and dtype."""

import torch

from mirotrain.optim.host_state import host_zeros, host_zeros_like


def test_host_zeros_own_exactly_their_bytes():
    for shape, dtype in (((3, 5), torch.bfloat16), ((7,), torch.float32), ((0, 4), torch.bfloat16)):
        t = host_zeros(shape, dtype, pin=False)
        assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu"
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    like = host_zeros_like(torch.nn.Parameter(torch.ones(4, 6, dtype=torch.bfloat16)), pin=False)
    assert like.shape == (4, 6) and like.dtype == torch.bfloat16 and not like.requires_grad
