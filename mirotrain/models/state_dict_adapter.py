"""The state-dict adapter contract: which Hugging Face tensors make up each native parameter.

A native parameter is either one HF tensor under another name (same shape), or several HF tensors stacked
along dim 0 (MoE experts: one HF matrix per expert is one row of the native ``[E, ...]`` tensor). A family
(``models/qwen3/state_dict_adapter.py``, ``models/qwen3_moe/state_dict_adapter.py``) only says which, in
:meth:`StateDictAdapter.hf_parts`; cutting a native tensor into HF tensors (:meth:`to_hf`) and stacking HF
tensors into a native row range (:meth:`from_hf`) are the same for every family and live here.

Everything here is pure: tensors in, tensors out. Files are read by ``models/hf_io.py``, written by
``models/hf_writer.py``, and sharded parameters are handled by ``models/hf_weights.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# read(hf_name, rows) -> the HF tensor, or rows [start, stop) of its dim 0 (rows None: all of it)
ReadFn = Callable[[str, "tuple[int, int] | None"], torch.Tensor]


@dataclass(frozen=True)
class HFPart:
    """One HF tensor of a native parameter: ``rows`` rows of dim 0, or ``rows == 0`` for one row that the HF
    tensor holds without its leading dimension (a per-expert matrix of a stacked ``[E, ...]`` parameter)."""

    name: str
    rows: int

    @property
    def native_rows(self) -> int:
        return self.rows or 1


class StateDictAdapter:
    """HF <-> native mapping of one model family; subclasses implement :meth:`hf_parts`."""

    def hf_parts(self, native: str, shape: tuple[int, ...]) -> list[HFPart]:
        """The HF tensors of native parameter ``native`` (of ``shape``), in stacking order; KeyError if unknown."""
        raise NotImplementedError

    def hf_names(self, native_shapes: dict[str, tuple[int, ...]]) -> set[str]:
        """Every HF tensor name of a model whose parameters have ``native_shapes``."""
        return {part.name for native, shape in native_shapes.items() for part in self.hf_parts(native, shape)}

    def to_hf(self, native: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, contiguous HF tensor) for the full native ``tensor``, one at a time."""
        cursor = 0
        for part in self.hf_parts(native, tuple(tensor.shape)):
            piece = tensor[cursor] if part.rows == 0 else tensor[cursor:cursor + part.rows]
            cursor += part.native_rows
            yield part.name, piece.contiguous()

    def from_hf(self, native: str, shape: tuple[int, ...], read: ReadFn,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the native tensor (all of it for ``rows=None``), built from HF tensors that
        ``read`` returns; only the HF tensors (and rows of them) that overlap the range are read."""
        parts = self.hf_parts(native, shape)
        if len(parts) == 1 and parts[0].rows != 0:
            return read(parts[0].name, rows)
        start, stop = rows if rows is not None else (0, shape[0])
        pieces, cursor = [], 0
        for part in parts:
            lo, hi = max(start, cursor), min(stop, cursor + part.native_rows)
            if lo < hi:
                pieces.append(read(part.name, None).unsqueeze(0) if part.rows == 0
                              else read(part.name, (lo - cursor, hi - cursor)))
            cursor += part.native_rows
        return torch.cat(pieces) if pieces else torch.empty((0, *shape[1:]))
