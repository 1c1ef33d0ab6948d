"""The model call of a prepared batch, shared by the training step and the DPO reference pass."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


def forward_hidden(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Final hidden states [B, T, D] of ``batch``. MoE models also get ``token_mask`` (False on padding), so
    their router statistics and aux loss count real tokens only, as transformers' ``attention_mask`` does."""
    extra = {}
    if getattr(model.args, "is_moe", False) and batch.get("token_mask") is not None:
        extra["token_mask"] = batch["token_mask"]
    return model.forward_hidden(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"),
                                batch.get("max_seqlen"), **extra)
