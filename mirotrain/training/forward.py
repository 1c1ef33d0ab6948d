"""The model call of a prepared batch, shared by the training step and the DPO reference pass."""

from __future__ import annotations

import torch
from torch import nn

from mirotrain.data.batch import SFTBatch


def forward_hidden(model: nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Final hidden states [B, T, D] of ``batch``. MoE models also get ``token_mask`` (False on padding), so
    their router statistics and aux loss count real tokens only, as transformers' ``attention_mask`` does."""
    extra = {"token_mask": batch.token_mask} if getattr(model.args, "is_moe", False) else {}
    return model.forward_hidden(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, **extra)
