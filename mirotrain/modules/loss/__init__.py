"""Losses: chunked linear CE (default), Liger fused linear CE (CUDA); DPO losses live in ``dpo``.

SFT losses share one contract: ``loss(hidden [..., D], lm_head_weight [V, D], labels [...]) ->
(sum of token losses, number of trained tokens)``; the trainer normalises globally.
"""

from __future__ import annotations

from typing import Any

from mirotrain.modules.loss.liger import LigerLinearCrossEntropyLoss
from mirotrain.modules.loss.linear_ce import LinearCrossEntropyLoss


def __getattr__(name: str) -> Any:
    # DPO losses are imported on first use (module added by the DPO work) so SFT never needs them.
    if name == "DPOLoss":
        from mirotrain.modules.loss.dpo import DPOLoss

        return DPOLoss
    raise AttributeError(name)


__all__ = ["LigerLinearCrossEntropyLoss", "LinearCrossEntropyLoss"]
