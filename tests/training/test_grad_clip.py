"""Global-norm clipping against an independent computation (gather every gradient in full, fp64 sum of squares),
on 2 ranks: FSDP-sharded DTensor grads (uneven shards), a DTensor on a second mesh with a replicated placement
(must count once), and a plain tensor."""

import math

import pytest
import torch

from gloo_ranks import run_on_gloo_ranks

pytestmark = pytest.mark.slow  # 2 processes in one gloo group


def _worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    from mirotrain.training.grad_clip import clip_grad_norm_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))  # 7 rows over 2 ranks: uneven
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.randn(4, 5) + rank).pow(2).sum().backward()
    other_mesh = init_device_mesh("cpu", (world,))
    rep = torch.nn.Parameter(distribute_tensor(torch.zeros(6), other_mesh, [Replicate()]))
    rep.grad = distribute_tensor(torch.arange(6.0), other_mesh, [Replicate()])
    plain = torch.nn.Parameter(torch.zeros(3))
    plain.grad = torch.tensor([3.0, 4.0, 12.0])
    params = list(model.parameters()) + [rep, plain]

    full = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in full))
    norm = clip_grad_norm_(params, "inf")  # measure only
    assert abs(norm.item() - expected) <= 1e-5 * expected, (norm.item(), expected)
    before = [g.clone() for g in full]
    norm = clip_grad_norm_(params, 1.0)
    after = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
    clipped = math.sqrt(sum(float((g.double() ** 2).sum()) for g in after))
    assert abs(clipped - 1.0) <= 1e-5
    for a, b in zip(after, before):
        assert torch.allclose(a, b / (expected + 1e-6), atol=1e-7)


def test_clip_norm_equals_an_independent_computation(tmp_path):
    run_on_gloo_ranks(_worker, 2, tmp_path)
