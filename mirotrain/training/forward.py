"""A batch's way into the model: this rank's share of it on the device (:class:`BatchPlacement`), and the
model call (:func:`forward_hidden`), shared by the training step and the DPO reference pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from mirotrain.config.schema import ModelConfig
from mirotrain.data.batch import SFTBatch
from mirotrain.parallel.fsdp import fsdp_modules

B = TypeVar("B", bound=SFTBatch)


@dataclass(frozen=True)
class BatchPlacement:
    """Cuts a host batch to this rank's Ulysses SP shard (on the host), then moves its inputs to the device;
    labels stay on the host, where the losses select the trained tokens without a device sync."""

    device: torch.device
    sp_rank: int = 0
    sp_size: int = 1
    pad_id: int = 0

    def __call__(self, batch: B) -> B:
        if self.sp_size > 1:
            from mirotrain.parallel.ulysses import shard_batch_for_sp

            batch = batch.replace(**shard_batch_for_sp(batch.token_fields(), self.sp_rank, self.sp_size, self.pad_id))
        return batch.to(self.device)


@dataclass(frozen=True)
class HeadChunks:
    """Tokens per LM-head chunk of a prepared batch: ``loss_chunk_tokens``, or ``unembed_chunk_size`` chunks of
    the row this rank holds (:meth:`ModelConfig.chunk_tokens`), else ``default`` (None: the loss's own)."""

    model: ModelConfig
    default: int | None = None

    def __call__(self, batch: SFTBatch) -> int | None:
        return self.model.chunk_tokens(batch.input_ids.shape[-1]) or self.default


def forward_hidden(model: nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Final hidden states [B, T, D] of ``batch``. MoE models also get ``token_mask`` (False on padding), so
    their router statistics and aux loss count real tokens only, as transformers' ``attention_mask`` does."""
    extra = {"token_mask": batch.token_mask} if getattr(model.args, "is_moe", False) else {}
    return model.forward_hidden(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, **extra)


def reshard(model: nn.Module) -> None:
    """Free the parameters a forward without backward left gathered (FSDP reshards the root in backward)."""
    for module in fsdp_modules(model):
        module.reshard()
