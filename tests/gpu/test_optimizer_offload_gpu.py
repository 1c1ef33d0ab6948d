"""``optimizer_state_offload`` on one GPU: the compensated AdamW with its moments and compensation in pinned host
memory (DTensors over host shards, like the FSDP2 weights' specs), streamed through the GPU chunk by chunk with the
next chunk's copy on a side stream (mirotrain/optim/host_state.py), trains a small bf16 Qwen3 under FSDP2 bitwise
like the same optimizer with its state on the GPU, holds none of that state on the GPU between steps, and keeps
it in host memory through a DCP save and load of the optimizer state (the step checkpoints' path; torch's own
``Optimizer.load_state_dict`` would move it to the GPU)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mirotrain.models.qwen3 import qwen3
from mirotrain.optim.bf16_adamw import STATE_NAMES, CompensatedAdamW

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ports import free_port  # noqa: E402

STEPS, TOKENS, VOCAB = 5, 512, 8192


@pytest.fixture
def mesh(cuda):
    from torch.distributed.device_mesh import init_device_mesh

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield init_device_mesh("cuda", (1,))
    dist.destroy_process_group()


def _model(mesh) -> torch.nn.Module:
    """A bf16 Qwen3 of ~20M parameters under FSDP2, the same weights each call."""
    from torch.distributed.fsdp import fully_shard

    from mirotrain.training.builders import cast_parameters

    cuda = torch.device("cuda", 0)
    model = qwen3(vocab_size=VOCAB, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536,
                  max_seq_len=TOKENS).to(cuda)
    model.init_weights(seed=0, device=cuda)
    cast_parameters(model, torch.bfloat16)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _on_host(t: torch.Tensor) -> bool:
    local = t.to_local()
    return local.device.type == "cpu" and local.is_pinned()


def test_offloaded_state_trains_bitwise_as_the_resident_state(mesh, monkeypatch, tmp_path):
    """Both optimizers take the same gradients (one model's backward; attention and embedding backward kernels
    need not be deterministic) and the same random bits, in lockstep for ``STEPS`` steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    import mirotrain.optim.bf16_adamw as bf16_adamw

    monkeypatch.setattr(bf16_adamw, "CHUNK_ELEMENTS", 1 << 20)  # ~20 chunks a step: the prefetch pipeline runs
    offloaded, resident = _model(mesh), _model(mesh)
    opt = CompensatedAdamW(offloaded.parameters(), lr=1e-3, weight_decay=0.01, offload_state=True)
    ref = CompensatedAdamW(resident.parameters(), lr=1e-3, weight_decay=0.01)
    cuda = torch.device("cuda", 0)
    ids = torch.randint(0, VOCAB, (1, TOKENS), device=cuda, generator=torch.Generator(cuda).manual_seed(1))
    torch.cuda.manual_seed(2)
    for _ in range(STEPS):
        torch.nn.functional.cross_entropy(offloaded(ids)[0, :-1].float(), ids[0, 1:]).backward()
        for p, q in zip(offloaded.parameters(), resident.parameters()):
            q.grad = p.grad.clone()
        bits = torch.cuda.get_rng_state()  # the second moment's stochastic rounding draws the same bits in both
        opt.step()
        torch.cuda.set_rng_state(bits)
        ref.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    n_params = sum(p.numel() for p in offloaded.parameters())
    # both models' bf16 weights (2 + 2 B/param) and the resident state (6), plus what else the step left allocated
    # (measured on an H200: 13.64 B/param in all, 32 MiB of it cuBLAS's workspace); the offloaded state would add
    # its 6 B/param
    allocated = torch.cuda.memory_allocated(cuda)
    assert 10 * n_params <= allocated < 16 * n_params, (n_params, allocated, allocated / n_params)
    for (name, p), q in zip(offloaded.named_parameters(), resident.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), name
        for key in STATE_NAMES:
            assert _on_host(opt.state[p][key]), (name, key)
            assert torch.equal(opt.state[p][key].to_local(), ref.state[q][key].to_local().cpu()), (name, key)
    assert opt.state[p]["compensation"].to_local().abs().max() > 0

    want = {(id(p), key): opt.state[p][key].to_local().clone() for p in offloaded.parameters() for key in STATE_NAMES}
    dcp.save({"optim": get_optimizer_state_dict(offloaded, opt)}, checkpoint_id=str(tmp_path))
    for state in opt.state.values():
        for key in STATE_NAMES:
            state[key].to_local().fill_(3.0)
    loaded = {"optim": get_optimizer_state_dict(offloaded, opt)}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(offloaded, opt, loaded["optim"])
    for p in offloaded.parameters():
        for key in STATE_NAMES:
            assert _on_host(opt.state[p][key]) and torch.equal(opt.state[p][key].to_local(), want[(id(p), key)])
