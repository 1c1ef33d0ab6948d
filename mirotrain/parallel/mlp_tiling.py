"""MLP tiling (config key ``mlp_tiles``), applied from outside the model like activation checkpointing.

Each dense :class:`~mirotrain.modules.mlp.FeedForward` of ``model.layers`` gets the class
:class:`TiledFeedForward`, whose forward is :func:`~mirotrain.modules.tiled_mlp.tiled_swiglu`: the same math
over slices of the hidden width, recomputed in backward, so the running layer holds one slice's activations
instead of the whole MLP's. Swapping the class (as FSDP2's ``fully_shard`` does) keeps the parameters, their
names and every state-dict key as they are. MoE layers have no dense MLP and are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from mirotrain.modules.mlp import FeedForward
from mirotrain.modules.tiled_mlp import tiled_swiglu


class TiledFeedForward(FeedForward):
    """A :class:`FeedForward` computed in ``tiles`` slices of its hidden width (set by :func:`apply_mlp_tiling`)."""

    tiles: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight, self.tiles)


def apply_mlp_tiling(model: nn.Module, tiles: int) -> None:
    """Give every dense MLP of ``model.layers`` ``tiles`` tiles, in place (1: leave the model as it is); a model
    without one (MoE) is refused, as `mirotrain validate` refuses the config."""
    if tiles == 1:
        return
    mlps = [m for layer in model.layers for m in layer.modules() if type(m) is FeedForward]
    if not mlps:
        raise ValueError(f"mlp_tiles ({tiles}) tiles dense MLPs; this model has none (use 1 or auto)")
    for module in mlps:
        module.__class__ = TiledFeedForward
        module.tiles = tiles
