"""Token-choice top-k router and the statistics the load-balancing losses are built from.

Per token t with hidden x_t:  p_t = softmax(W_g x_t)  (always in fp32, also under bf16 compute),
(w_t, e_t) = top-k(p_t),  w_t <- w_t / sum(w_t) when ``norm_topk_prob``.

Each forward records, per layer, only E-sized sums (never per-token tensors), so the losses can be formed
over all layers and tokens together, and over data-parallel ranks, at the end of the forward:

    counts[e]   = sum_t m_t * #{j : e_tj = e}      (no gradient: top-k is piecewise constant)
    prob_sum[e] = sum_t m_t * p_te                  (carries the gradient of the load-balancing loss)
    n_tokens    = sum_t m_t
    z_sum       = sum_t m_t * logsumexp(W_g x_t)^2  (router z-loss, ST-MoE; only when enabled)

m_t is the optional token mask (1 = real token, 0 = padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterStats:
    """E-sized routing sums of one layer's last forward (see the module docstring)."""

    counts: torch.Tensor  # [E] fp32, detached
    prob_sum: torch.Tensor  # [E] fp32, differentiable
    n_tokens: torch.Tensor  # [] fp32, detached
    z_sum: torch.Tensor | None  # [] fp32, differentiable; None when the z-loss is off


def _recomputing_in_backward() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing the layer.

    The recomputation must not replace ``stats``: the loss was formed from the forward's sums, and a recomputed
    ``prob_sum`` would keep the recomputed graph alive through the module (everything the layer saved up to the
    router: its attention half) until the next forward, in every layer at once by the end of the backward
    (~1.3 GiB per full-width 30B-A3B layer at 16K tokens). The sums are still computed there (with a token mask
    they save tensors, and checkpointing checks that the recomputation saves what the forward saved), then
    dropped. Under torch.compile's tracing this is the forward (the recomputation of an eagerly checkpointed
    layer runs in eager mode, in the backward)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class TopKRouter(nn.Module):
    """Linear gate (HF ``mlp.gate.weight`` [E, D]) + fp32 softmax + top-k."""

    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk_prob: bool = True,
                 compute_z_loss: bool = False):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.compute_z_loss = compute_z_loss
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.stats: RouterStats | None = None

    def __getstate__(self) -> dict:
        # The last forward's sums hold autograd history: not copyable (deepcopy of a model, e.g. for a
        # DPO reference) and meaningless in a copy.
        state = self.__dict__.copy()
        state["stats"] = None
        return state

    def init_weights(self, std: float, generator: torch.Generator) -> None:
        w = torch.empty(self.weight.shape, device=generator.device).normal_(0.0, std, generator=generator)
        with torch.no_grad():
            self.weight.copy_(w.to(self.weight.device, self.weight.dtype))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (weights [N, k] fp32, expert ids [N, k] int64); records ``self.stats``."""
        # The gate is tiny (E x D): run it with fp32 accumulation and softmax so near-tied experts are
        # ranked as the fp32 reference ranks them.
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        stats = self._statistics(logits, probs, experts, token_mask)  # also recomputed: it saves tensors too
        if not _recomputing_in_backward():
            self.stats = stats
        return weights, experts

    def _statistics(self, logits: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor,
                    token_mask: torch.Tensor | None) -> RouterStats:
        n = probs.shape[0]
        if token_mask is None:
            m = probs.new_ones(n)
        else:
            m = token_mask.reshape(-1).to(device=probs.device, dtype=torch.float32)
            if m.numel() != n:
                raise ValueError(f"token_mask has {m.numel()} entries for {n} tokens")
        with torch.no_grad():
            # scatter_add (not bincount) so nothing waits on the device
            counts = probs.new_zeros(self.num_experts).scatter_add_(
                0, experts.reshape(-1), m.repeat_interleave(self.top_k))
            n_tokens = m.sum()
        prob_sum = (probs * m.unsqueeze(-1)).sum(dim=0) if token_mask is not None else probs.sum(dim=0)
        z_sum = None
        if self.compute_z_loss:
            z_sum = (torch.logsumexp(logits, dim=-1).square() * m).sum()
        return RouterStats(counts=counts, prob_sum=prob_sum, n_tokens=n_tokens, z_sum=z_sum)
