"""Forced balanced routing and an expert-load meter for MoE benchmarks, the same for our model and transformers'.

Balanced routing (every expert forced to the same load, for measuring speed without the imbalance of random
routers): inside every router's forward the gate's logits ``z = F.linear(x, W_g)`` are replaced by
``z * 0 + P`` with the fixed pattern P[t, e] = 1 when expert e is in token t's round-robin slice
``{(t*k + j) mod E : j < k}``, else 0. Everything after the gate is the model's own code: the softmax, the
top-k (which then picks exactly token t's slice), the weights, the router statistics and the aux loss, and the
backward still runs through the gate (with zero gradient). With N*k a multiple of E every expert gets exactly
N*k/E rows on every rank.

The gate is found by what computes it, not by name: our ``TopKRouter`` (mirotrain/modules/moe/router.py) and
transformers' ``mlp.gate`` (``Qwen3MoeTopKRouter`` in transformers 5, an ``nn.Linear`` in 4.x) both call
``F.linear`` once with E outputs, which a ``TorchFunctionMode`` active for the router's forward intercepts.
A model with no router, or a router that computes no such linear, is an error, never a silent no-op.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def balanced_pattern(n_tokens: int, num_experts: int, top_k: int, like: torch.Tensor) -> torch.Tensor:
    """[n_tokens, E] logits whose top-k for token t is the round-robin slice {(t*k + j) mod E : j < k}."""
    t = torch.arange(n_tokens, device=like.device).unsqueeze(1)
    e = torch.arange(num_experts, device=like.device).unsqueeze(0)
    return ((e - t * top_k) % num_experts < top_k).to(like.dtype)


class _CraftGateLogits(TorchFunctionMode):
    """Replaces the output of every ``F.linear`` with ``num_experts`` outputs by the balanced pattern."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k, self.replaced = num_experts, top_k, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and out.shape[-1] == self.num_experts:
            flat = out.reshape(-1, self.num_experts)
            pattern = balanced_pattern(flat.shape[0], self.num_experts, self.top_k, flat)
            out = (flat * 0 + pattern).reshape(out.shape)  # still a function of the gate: backward runs through it
            self.replaced += 1
        return out


def router_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The gate of every MoE layer: our ``TopKRouter`` or transformers' ``...mlp.gate``."""
    from mirotrain.modules.moe.router import TopKRouter

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, TopKRouter) or n.endswith("mlp.gate")]
    if not found:
        raise RuntimeError(f"no MoE router in {type(model).__name__}: expected mirotrain's TopKRouter or a "
                           "transformers '...mlp.gate' module")
    return found


def install_balanced_routing(model: nn.Module, num_experts: int, top_k: int) -> int:
    """Force balanced routing in every router of ``model`` (see the module docstring); returns how many."""
    routers = router_modules(model)
    for name, router in routers:
        router.forward = functools.partial(_balanced_forward, router.forward, name, num_experts, top_k)
    return len(routers)


def _balanced_forward(forward, name: str, num_experts: int, top_k: int, *args, **kwargs):
    mode = _CraftGateLogits(num_experts, top_k)
    with mode:
        out = forward(*args, **kwargs)
    if mode.replaced != 1:
        raise RuntimeError(f"balanced routing: router {name} computed {mode.replaced} linear maps with "
                           f"{num_experts} outputs (expected its one gate); this model's router is not supported")
    return out


class LoadMeter:
    """Counts the top-k assignments per expert of every router of a transformers Qwen3-MoE (our model keeps its
    own counts: ``expert_load_stats``), from the router's output: the expert indices (transformers 5) or the
    logits (4.x, where the block takes the top-k)."""

    def __init__(self, model: nn.Module, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.counts: list[torch.Tensor] = []
        for i, (_, router) in enumerate(router_modules(model)):
            self.counts.append(torch.zeros(num_experts, dtype=torch.int64))
            router.register_forward_hook(functools.partial(self._count, i))

    @torch.no_grad()
    def _count(self, layer: int, module: nn.Module, args, out) -> None:
        experts = out[2] if isinstance(out, tuple) else out.topk(self.top_k, dim=-1).indices
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        self.counts[layer] = self.counts[layer].to(counts.device) + counts

    def max_over_mean(self) -> float:
        """The worst layer's busiest-expert count over its mean count, over every forward so far."""
        return max((c.max() / c.float().mean().clamp_min(1e-9)).item() for c in self.counts)
