"""Expert parallelism (EP) for Qwen3-MoE, applied from outside the model.

Layout. The W data-parallel ranks are arranged as a 2-D mesh ("edp", "ep") = (W / EP, EP) with
contiguous EP groups (ranks r*EP .. r*EP + EP-1, i.e. inside a node). EP rank i of a group owns experts
[i*E/EP, (i+1)*E/EP) of every MoE layer: the stacked expert weights become DTensors sharded on dim 0 over
"ep" (global shape kept, so HF loading reads only the owned experts, DCP checkpoints stay resharding-
friendly and ``save_pretrained`` gathers them). Every rank still routes its own tokens.

Dispatch (per MoE layer, forward):
  1. exchange split sizes: one all-to-all of the [EP, E/EP] per-expert counts (the only size exchange,
     and the layer's only host sync: the variable all-to-all needs the sizes on the host);
  2. all-to-all-v the expert-sorted rows to the owners; reorder received chunks from (source rank,
     expert) to (expert, source rank) so each local expert's rows are contiguous; run the experts;
  3. undo the reorder and all-to-all-v the outputs back.
Backward replays the two all-to-alls with the splits swapped (no further size exchange).

Gradients. A rank's expert weights collect gradient from the tokens of all EP ranks of its group (the
all-to-all backward brings it home), a non-expert weight only from the rank's own tokens. For both to
be the mean over the W data-parallel ranks, expert grads are summed over "edp" and divided by W, not by
the edp size W/EP (that would make them EP x too large): ``parallel/fsdp.py`` gives the experts their own
FSDP unit over "edp" with divide factor W. ``models/qwen3_moe/parallelize.py`` applies EP, then FSDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from mirotrain.modules.moe import GroupedExperts, MoE
from mirotrain.modules.moe.permute import inverse_permutation, permute_rows


def check_expert_parallel(num_experts: int, world_size: int, ep: int) -> None:
    """Raise ValueError, naming the setting to change, unless EP divides both the experts and the world."""
    if ep < 1:
        raise ValueError(f"moe_expert_parallel_size must be >= 1, got {ep}")
    if world_size % ep:
        raise ValueError(f"moe_expert_parallel_size={ep} must divide the number of data-parallel ranks "
                         f"({world_size}); use one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}")
    if num_experts % ep:
        raise ValueError(f"moe_expert_parallel_size={ep} must divide num_experts={num_experts}; use one of "
                         f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0 and world_size % d == 0]}")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """MoE dispatcher for one EP group (see the module docstring); replaces ``MoE.dispatcher``."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.num_local = num_experts // self.ep

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
        ep, n_local = self.ep, self.num_local
        # 1. split sizes: send_counts[j, e] = my rows for expert e of rank j; recv_counts[i, e] = rows of
        #    rank i for my local expert e.
        send_counts = counts.view(ep, n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        host = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the layer's one host sync
        in_splits, out_splits = host[:ep], host[ep:]
        # 2. rows to their experts' owners, regrouped by local expert
        received = all_to_all(x, out_splits, in_splits, self.group)  # [(source, expert) chunks]
        order = _source_major_to_expert_major(recv_counts, sum(out_splits))
        inverse = inverse_permutation(order)
        y = experts(permute_rows(received, order, inverse), recv_counts.sum(0))
        # 3. back to (source, expert) order and home
        y = permute_rows(y, inverse, order)
        return all_to_all(y, in_splits, out_splits, self.group)


def _source_major_to_expert_major(chunk_sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Row permutation taking chunks laid out (source, expert)-major to (expert, source)-major order.

    chunk_sizes: [S, E] rows of chunk (s, e); returns idx with new_rows = rows[idx]. No host sync.
    """
    sizes = chunk_sizes.reshape(-1)
    starts = torch.cumsum(sizes, 0) - sizes  # start of chunk (s, e) in source-major layout
    sizes_em = chunk_sizes.t().reshape(-1)
    starts_em = starts.view_as(chunk_sizes).t().reshape(-1)
    chunk_start_in_new = torch.cumsum(sizes_em, 0) - sizes_em
    pos = torch.arange(total, device=chunk_sizes.device)
    offset_in_chunk = pos - torch.repeat_interleave(chunk_start_in_new, sizes_em, output_size=total)
    return torch.repeat_interleave(starts_em, sizes_em, output_size=total) + offset_in_chunk


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over the 1-D ``ep_mesh`` and switch it to all-to-all dispatch.

    Works on a model on ``meta`` (then materialise with ``to_empty`` and load) or with real weights
    (each rank keeps its rows). Apply before activation checkpointing, compile and FSDP.
    """
    from torch.distributed.tensor import DTensor, Shard

    if ep_mesh.ndim != 1:
        raise ValueError("apply_expert_parallel takes the 1-D 'ep' mesh, e.g. mesh['ep']")
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for moe in _moe_layers(model):
        check_expert_parallel(moe.num_experts, dist.get_world_size(), ep)
        n_local = moe.num_experts // ep
        for name in ("w1", "w3", "w2"):
            p = getattr(moe.experts, name)
            local = p.detach()[rank * n_local:(rank + 1) * n_local].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            setattr(moe.experts, name, nn.Parameter(dt, requires_grad=p.requires_grad))
        moe.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), moe.num_experts)
