"""Qwen3-MoE: the Qwen3 decoder with sparse (MoE) feed-forward layers.

A layer l is MoE iff num_experts > 0, l is not in ``mlp_only_layers`` and (l + 1) % decoder_sparse_step
== 0 (as the Hugging Face model decides); other layers keep the dense SwiGLU of width ``hidden_dim``.

Router losses. Every MoE layer records E-sized routing sums during the forward; after the forward,
``moe_aux_loss(group)`` turns the sums of all layers into

    router_aux_loss_coef * load_balancing_loss  +  router_z_loss_coef * z_loss

(definitions in mirotrain.modules.moe.losses: the load-balancing loss is transformers'
``load_balancing_loss_func`` over all layers and tokens together). With ``group`` = the data-parallel
(x sequence-parallel) process group, the statistics are global and the returned tensor is this rank's
share: the shares of all ranks sum to the global loss, exactly as the CE term "local token-loss sum /
global token count" does, so the trainer adds it to the CE share before any scaling. With gradient
accumulation the trainer divides it by the number of micro-batches (the loss is a per-micro-batch mean).

Padding: ``forward(..., token_mask=m)`` ([B, T], 1 = real token) excludes padded positions from the
router statistics (they are still routed and computed, as in transformers with an attention mask). The
mask is read when the MoE layers run, so with activation checkpointing run backward before the next
forward that passes a different mask (the recomputation reads it again). Use non-reentrant activation
checkpointing: the router sums leave the checkpointed region through the layer, not its output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mirotrain.models.qwen3.model import Qwen3Args, Qwen3Transformer
from mirotrain.modules.mlp import FeedForward
from mirotrain.modules.moe import MoE, expert_load, router_losses
from mirotrain.modules.moe.router import RouterStats


def is_moe_layer(args: Qwen3Args, layer_id: int) -> bool:
    return (args.num_experts > 0 and layer_id not in args.mlp_only_layers
            and (layer_id + 1) % args.decoder_sparse_step == 0)


class Qwen3MoeTransformer(Qwen3Transformer):
    """Qwen3 with MoE feed-forward layers; same call signature as the dense model."""

    def __init__(self, args: Qwen3Args):
        if not args.is_moe:
            raise ValueError("Qwen3MoeTransformer needs num_experts > 0 (use Qwen3Transformer for dense models)")
        super().__init__(args)

    def build_feed_forward(self, layer_id: int) -> nn.Module:
        a = self.args
        if not is_moe_layer(a, layer_id):
            return FeedForward(a.dim, a.hidden_dim)
        return MoE(a.dim, a.moe_hidden_dim, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob,
                   backend=a.moe_backend, compute_z_loss=a.router_z_loss_coef > 0)

    def moe_layers(self) -> list[MoE]:
        return [layer.feed_forward for layer in self.layers if isinstance(layer.feed_forward, MoE)]

    def forward_hidden(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, *,
                       token_mask: torch.Tensor | None = None):
        """Final normed hidden states [B, T, D]; ``token_mask`` [B, T] marks real tokens (router stats)."""
        mask = None if token_mask is None else token_mask.reshape(-1)
        for moe in self.moe_layers():
            moe.token_mask = mask
        return super().forward_hidden(input_ids, position_ids, cu_seqlens, max_seqlen)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, *,
                token_mask: torch.Tensor | None = None):
        """Logits [B, T, V]."""
        h = self.forward_hidden(input_ids, position_ids, cu_seqlens, max_seqlen, token_mask=token_mask)
        return nn.functional.linear(h, self.lm_head_weight)

    def _router_stats(self) -> list[RouterStats]:
        stats = [moe.router.stats for moe in self.moe_layers()]
        if not stats or any(s is None for s in stats):
            raise RuntimeError("no router statistics: call the model's forward first")
        return stats

    def router_losses(self, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unweighted (load-balancing, z or None) shares of the last forward; see the module docstring."""
        return router_losses(self._router_stats(), self.args.num_experts, group)

    def moe_aux_loss(self, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
        """Coefficient-weighted router loss share of the last forward (None when both coefficients are 0).

        ``group``: ranks whose tokens form the global batch (DP x SP, EP ranks included); a collective on
        it. None: local statistics (equals transformers' ``aux_loss`` for this rank's batch).
        """
        a = self.args
        if a.router_aux_loss_coef == 0 and a.router_z_loss_coef == 0:
            return None
        aux, z = self.router_losses(group)
        loss = a.router_aux_loss_coef * aux
        if z is not None and a.router_z_loss_coef:
            loss = loss + a.router_z_loss_coef * z
        return loss

    @torch.no_grad()
    def expert_load_stats(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Logging metrics of the last forward (host sync; a collective on ``group`` when given).

        Per MoE layer l: ``moe/layer_{l}/max_load`` and ``.../mean_load`` (top-k assignments per expert);
        overall: ``moe/max_over_mean_load`` (worst layer), ``moe/aux_loss`` and ``moe/z_loss`` (unweighted,
        global over ``group``).
        """
        stats = self._router_stats()
        load = expert_load(stats, group)  # [L, E]
        layer_ids = [i for i, layer in enumerate(self.layers) if isinstance(layer.feed_forward, MoE)]
        mx, mean = load.max(dim=1).values, load.mean(dim=1)
        out: dict[str, float] = {}
        for i, lid in enumerate(layer_ids):
            out[f"moe/layer_{lid}/max_load"] = float(mx[i])
            out[f"moe/layer_{lid}/mean_load"] = float(mean[i])
        out["moe/max_over_mean_load"] = float((mx / mean.clamp_min(1e-9)).max())
        aux, z = router_losses(stats, self.args.num_experts, group)  # shares: their sum is the global value
        totals = torch.stack([aux, z if z is not None else torch.zeros_like(aux)]).detach()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(totals, group=group)
        out["moe/aux_loss"] = float(totals[0])
        if z is not None:
            out["moe/z_loss"] = float(totals[1])
        return out
