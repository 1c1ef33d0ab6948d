"""Dropless token-choice MoE feed-forward (Qwen3-MoE's sparse block).

    (w, e) = router(x)                             w, e: [N, k]
    out_t  = sum_j w_tj * Expert_{e_tj}(x_t)

computed as: sort the N*k (token, slot) copies by expert, run every expert on its contiguous rows
(grouped GEMM), put the rows back in (token, slot) order and take the w-weighted sum over the k slots.
No capacity factor, no dropped tokens. The two reorderings save only their indices and their backward
is a gather (``permute.py``).

The middle step goes through ``self.dispatcher``. On one device it calls the experts directly;
expert parallelism (mirotrain.parallel.expert_parallel) swaps in an all-to-all dispatcher that ships the
rows to the ranks owning their experts and back, so this module holds no distributed code.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from mirotrain.modules.moe.experts import GroupedExperts
from mirotrain.modules.moe.permute import expand_rows, inverse_permutation, permute_rows
from mirotrain.modules.moe.router import TopKRouter


class Dispatcher(Protocol):
    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
        """x: [M, D] rows sorted by global expert id, counts: [E] rows per expert -> expert outputs [M, D]."""
        ...


def local_dispatch(x: torch.Tensor, counts: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """All experts live on this rank."""
    return experts(x, counts)


class MoE(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, norm_topk_prob: bool = True,
                 backend: str = "grouped_mm", compute_z_loss: bool = False):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = TopKRouter(dim, num_experts, top_k, norm_topk_prob, compute_z_loss)
        self.experts = GroupedExperts(num_experts, dim, hidden_dim, backend)
        self.dispatcher: Dispatcher = local_dispatch
        # Set by the model for the duration of a forward: 1 = real token, 0 = padding (router stats only).
        self.token_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        n, k = x.shape[0], self.top_k
        weights, experts = self.router(x, self.token_mask)  # [N, k]
        flat = experts.reshape(-1)  # [N*k], slot s = t*k + j
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        inverse = inverse_permutation(order)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        y_sorted = self.dispatcher(expand_rows(x, order, inverse, k), counts, self.experts)  # [N*k, D]
        y = permute_rows(y_sorted, inverse, order)  # back to slot order: y[order[i]] = y_sorted[i]
        # weighted sum over the k slots as one batched matmul (fp32 accumulation, deterministic)
        out = torch.bmm(weights.to(y.dtype).unsqueeze(1), y.view(n, k, -1)).squeeze(1)
        return out.reshape(shape)
