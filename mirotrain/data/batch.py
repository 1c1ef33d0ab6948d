"""Batches to the model: one typed batch per kind of row (the contract is in docs/contracts.md, "Data to the trainer").

:class:`SFTBatch` -- token rows: ``input_ids``, ``labels`` (already shifted: ``labels[t]`` is the target of
position t, -100 = ignored), ``position_ids`` and ``token_mask`` (False on padding), all ``[B, T]``. Packed
rows (B = 1) also carry ``cu_seqlens`` ``[n+1]`` int32 and ``max_seqlen``: attention is causal within each
document and never crosses documents. Unpacked rows (B >= 1, right padded) have neither.

:class:`PreferenceBatch` -- a packed row of preference pairs (layout in :mod:`mirotrain.data.preference`):
the token fields plus, per pair, the segment indices of its chosen and rejected documents, its pair id and
any per-pair columns added after packing (the reference log-probs).

The collates (:mod:`mirotrain.data.collate`) build them on the host. The trainer shards them for sequence
parallelism (``shard_batch_for_sp`` in mirotrain/parallel/ulysses.py works on :meth:`SFTBatch.token_fields`)
and moves the model inputs to the device with :meth:`SFTBatch.to`; the labels and the pair indices stay on
the host, where the losses select trained tokens without a device sync (mirotrain/training/forward.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

IGNORE_INDEX = -100
TOKEN_FIELDS = ("input_ids", "labels", "position_ids", "token_mask", "cu_seqlens", "max_seqlen")
_MODEL_INPUTS = ("input_ids", "position_ids", "token_mask", "cu_seqlens")

B = TypeVar("B", bound="SFTBatch")


@dataclass(frozen=True)
class SFTBatch:
    """Token rows to the model (see the module docstring). ``host`` is the host batch a device batch was
    moved from (:meth:`to`), so host-side token selection never reads device tensors."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    token_mask: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    host: "SFTBatch | None" = field(default=None, repr=False, compare=False)

    def token_fields(self) -> dict[str, Any]:
        """The per-token fields (what sequence-parallel sharding splits or extends)."""
        return {name: getattr(self, name) for name in TOKEN_FIELDS}

    def replace(self: B, **changes: Any) -> B:
        return dataclasses.replace(self, **changes)

    def to(self: B, device: torch.device) -> B:
        """The model inputs on ``device`` (non-blocking); labels and per-pair fields stay on the host."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in _MODEL_INPUTS
                 if getattr(self, name) is not None}
        return dataclasses.replace(self, host=self, **moved)

    def num_targets(self) -> int:
        """Trained tokens (labels != -100), counted on the host."""
        labels = self.host.labels if self.host is not None else self.labels
        return int((labels != IGNORE_INDEX).sum())

    def doc_lengths(self) -> list[int]:
        """Document lengths: from ``cu_seqlens`` (packed) or one per row (unpacked)."""
        src = self.host if self.host is not None else self
        if src.cu_seqlens is not None:
            cu = src.cu_seqlens.tolist()
            return [b - a for a, b in zip(cu[:-1], cu[1:])]
        rows, length = src.input_ids.shape
        return [length] * rows


@dataclass(frozen=True, kw_only=True)
class PreferenceBatch(SFTBatch):
    """A packed row of preference pairs: ``chosen_index`` / ``rejected_index`` ``[P]`` (segment indices into
    ``cu_seqlens``), ``pair_ids`` ``[P]`` and ``pair_columns`` (per-pair float64 ``[P]``, e.g. the precomputed
    ``ref_chosen_logp`` / ``ref_rejected_logp``)."""

    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    pair_ids: torch.Tensor
    pair_columns: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_index.numel())
