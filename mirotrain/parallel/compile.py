"""torch.compile of decoder layers, applied from outside the model (after AC, before FSDP)."""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder layer's forward in place (FQNs unchanged).

    Only ``forward`` is compiled, not ``__call__``: the module hooks FSDP installs afterwards run eagerly around
    the compiled region (as with torchtitan's compile-then-shard order), whatever dynamo's FSDP-hook settings.
    """
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, fullgraph=False)
