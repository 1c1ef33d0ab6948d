"""Router losses over all MoE layers and tokens together, optionally over data-parallel ranks.

Load-balancing loss, defined as transformers' ``load_balancing_loss_func`` (Switch Transformer eq. 4-6
with top-k counts), over the L MoE layers and the N tokens of every participating rank at once:

    f_e = (1 / (L N)) sum_l counts_l[e]          fraction of top-k slots routed to e (sums to k)
    P_e = (1 / (L N)) sum_l prob_sum_l[e]        mean router probability of e
    aux = E * sum_e f_e P_e                      (k for perfectly uniform routing, whatever L is)

Router z-loss (ST-MoE), same normalisation:  z = (1 / (L N)) sum_l z_sum_l.

Data parallelism: with ``group`` given, the detached sums (counts, N) are all-reduced over it (one
collective of E + 1 floats), so f and N are global. The differentiable P is *not* reduced: each rank
returns its **share**, (E / (L N)) sum_e f_e sum_l prob_sum_l[e] with its own prob_sum, and the shares
of the ranks of ``group`` add up to the global loss and its gradient. That is how the token losses are
composed too (local sum / global token count), so the trainer adds the share to its CE share and scales
both alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from mirotrain.modules.moe.router import RouterStats


def _all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def router_losses(stats: Sequence[RouterStats], num_experts: int,
                  group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(load-balancing loss share, z-loss share or None) from the per-layer stats of one forward.

    ``group``: the ranks whose tokens form one global batch (data parallel x sequence parallel; the EP
    ranks are among them). Every rank of ``group`` must call this (it is a collective). None: this
    rank's tokens only, which equals transformers' value for the local batch.
    """
    if not stats:
        raise ValueError("no router statistics: run a forward pass of the MoE model first")
    counts = torch.stack([s.counts for s in stats]).sum(0)
    n_tokens = torch.stack([s.n_tokens for s in stats]).sum()
    reduced = _all_reduce_sum(torch.cat([counts, n_tokens.reshape(1)]).detach(), group)
    counts, total = reduced[:-1], reduced[-1].clamp_min(1.0)  # total = L * N over the group
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(0)
    aux = num_experts * torch.sum((counts / total) * (prob_sum / total))
    z = None
    if stats[0].z_sum is not None:
        z = torch.stack([s.z_sum for s in stats]).sum() / total
    return aux, z


@torch.no_grad()
def expert_load(stats: Sequence[RouterStats], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[L, E] top-k assignments per expert of each layer (summed over ``group``), for load metrics."""
    return _all_reduce_sum(torch.stack([s.counts for s in stats]).detach().float(), group)
