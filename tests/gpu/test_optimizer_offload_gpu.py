"""``optimizer_state_offload`` on a GPU: the compensated AdamW with its moments and compensation in pinned host
memory, streamed through the GPU chunk by chunk with the next chunk's copy on a side stream
(mirotrain/optim/host_state.py), trains a small bf16 Qwen3 bitwise like the same optimizer with its state on the
GPU, holds none of that state on the GPU between steps, and keeps it in host memory across a state-dict load
(torch's own load would move it to the GPU)."""

import pytest
import torch

from mirotrain.models.qwen3 import qwen3
from mirotrain.optim.bf16_adamw import STATE_NAMES, CompensatedAdamW

STEPS, TOKENS = 5, 512


def _train(cuda: torch.device, offload_state: bool) -> tuple[torch.nn.Module, CompensatedAdamW, int]:
    """A bf16 Qwen3 of ~25M parameters trained ``STEPS`` steps on fixed tokens; the bytes allocated on the GPU
    after the last step."""
    from mirotrain.training.builders import cast_parameters

    model = qwen3(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536,
                  max_seq_len=TOKENS).to(cuda)
    model.init_weights(seed=0, device=cuda)
    cast_parameters(model, torch.bfloat16)
    opt = CompensatedAdamW(model.parameters(), lr=1e-3, weight_decay=0.01, offload_state=offload_state)
    ids = torch.randint(0, 8192, (1, TOKENS), device=cuda, generator=torch.Generator(cuda).manual_seed(1))
    torch.cuda.manual_seed(2)  # the second moment's stochastic rounding
    for _ in range(STEPS):
        torch.nn.functional.cross_entropy(model(ids)[0, :-1].float(), ids[0, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return model, opt, torch.cuda.memory_allocated(cuda)


def test_offloaded_state_trains_bitwise_as_the_resident_state(cuda, monkeypatch):
    import mirotrain.optim.bf16_adamw as bf16_adamw

    monkeypatch.setattr(bf16_adamw, "CHUNK_ELEMENTS", 1 << 20)  # ~25 chunks a step: the prefetch pipeline runs
    offloaded, opt, offloaded_bytes = _train(cuda, offload_state=True)
    n_params = sum(p.numel() for p in offloaded.parameters())
    # between steps the GPU holds the bf16 weights (2 B/param; gradients are freed) and none of the state
    assert 2 * n_params <= offloaded_bytes < 2 * n_params + 16 * 2**20, (offloaded_bytes, n_params)
    resident, ref, both_bytes = _train(cuda, offload_state=False)
    assert both_bytes - offloaded_bytes >= 8 * n_params  # the resident run: its weights and 6 B/param of state
    for (name, p), q in zip(resident.named_parameters(), offloaded.parameters()):
        assert torch.equal(p, q), name
        for key in STATE_NAMES:
            host = opt.state[q][key]
            assert host.device.type == "cpu" and host.is_pinned(), (name, key)
            assert torch.equal(host, ref.state[p][key].cpu()), (name, key)
    assert not torch.equal(opt.state[q]["compensation"], torch.zeros_like(opt.state[q]["compensation"]))

    opt.load_state_dict(opt.state_dict())
    assert all(opt.state[p][key].device.type == "cpu" for p in offloaded.parameters() for key in STATE_NAMES)
