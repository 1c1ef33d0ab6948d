"""Gradient clipping by the true global L2 norm: sqrt of the summed squares over every shard and mesh.

Summing per-group *norms* (dense + expert) would overstate the global norm, and expert and dense gradients
live on different meshes. So gradients are grouped by (mesh, placements); each group's norm is computed by
DTensor (whose reduction knows which mesh dims are sharded and which are replicated, so replicas are counted
once), and the groups are combined as sqrt(Σ norm²). Plain-tensor gradients are treated as identical replicas
(counted once). Everything stays on the device: no host sync.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


def _group_key(grad: torch.Tensor) -> tuple:
    if isinstance(grad, DTensor):
        return ("dtensor", id(grad.device_mesh), tuple(grad.placements), grad.device.type)
    return ("tensor", grad.device.type)


@torch.no_grad()
def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all ``grads`` as one fp32 scalar on the first gradient's device (0 if there are none)."""
    if not grads:
        return torch.zeros(())
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[_group_key(g)].append(g)
    device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups.values():
        norms = torch._foreach_norm(group, 2.0)
        group_norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
        if isinstance(group_norm, DTensor):
            group_norm = group_norm.full_tensor()  # reduces partial norms across the shard dims of the mesh
        total_sq = total_sq + group_norm.to(device) ** 2
    return total_sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float | str | None) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; return the norm before.

    ``max_norm`` = "inf" (or math.inf) only measures. Scaling multiplies by min(1, max_norm / (norm + 1e-6))
    on the device, so no host sync is needed.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = global_grad_norm(grads)
    limit = math.inf if max_norm is None or str(max_norm).lower() == "inf" else float(max_norm)
    if math.isfinite(limit) and grads:
        coef = torch.clamp(limit / (total + 1e-6), max=1.0)
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            groups[(_group_key(g), g.dtype)].append(g)
        for group in groups.values():
            local = group[0].to_local() if isinstance(group[0], DTensor) else group[0]
            torch._foreach_mul_(group, coef.to(local.device, local.dtype))
    return total
