"""Liger's fused linear cross-entropy (Triton, CUDA only) behind the same interface as our chunked loss.

Imported lazily so that CPU installs (and CI) never need liger-kernel; on CPU it fails with a message that
names the alternative. Same contract as :class:`LinearCrossEntropyLoss`: ``(loss_sum, n_tokens)``.
"""

from __future__ import annotations

import torch
from torch import nn

from mirotrain.modules.loss.linear_ce import select_targets


def _liger_loss_class():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        raise ImportError(
            "LigerLinearCrossEntropyLoss needs the liger-kernel package (pip install 'mirotrain[gpu]'); "
            "or use loss._component_: mirotrain.modules.loss.LinearCrossEntropyLoss"
        ) from exc
    return LigerFusedLinearCrossEntropyLoss


class LigerLinearCrossEntropyLoss(nn.Module):
    """Liger fused linear + CE (sum over trained tokens). CUDA only.

    Args:
        ignore_index: label value of untrained positions.
        num_output_chunks: accepted for compatibility (Liger chunks internally).
    """

    def __init__(self, ignore_index: int = -100, num_output_chunks: int = 8):
        super().__init__()
        self.ignore_index = ignore_index
        self._fn = None

    def apply_compile(self) -> None:
        """No-op: the Liger kernel is already a fused Triton kernel."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.device.type != "cuda":
            raise RuntimeError(
                "LigerLinearCrossEntropyLoss runs on CUDA only (Triton kernel); on CPU use "
                "loss._component_: mirotrain.modules.loss.LinearCrossEntropyLoss"
            )
        if self._fn is None:
            self._fn = _liger_loss_class()(ignore_index=self.ignore_index, reduction="sum")
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        index, targets = select_targets(labels, self.ignore_index, flat_hidden.device)
        selected = flat_hidden.index_select(0, index)
        if selected.dtype != weight.dtype:
            selected = selected.to(weight.dtype)
        count = torch.full((), index.numel(), dtype=torch.long, device=flat_hidden.device)
        if index.numel() == 0:  # keep the graph connected so every rank runs the same backward
            return (selected.sum() * 0.0 + weight.sum() * 0.0).float(), count
        return self._fn(weight, selected, targets).float(), count
