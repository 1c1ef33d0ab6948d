"""DPO rows: many preference pairs per packed row, each pair's chosen and rejected in the same row.

Why in one row: the DPO loss compares a pair's chosen and rejected log-probabilities; keeping both in the
same row means one forward pass yields both sums, no pair straddles ranks or micro-batches, and the
reference log-probs written later join on the same row.

How many per row: as many as fit in ``packed_seq_len`` (the fast path; an optimizer step then trains
rows × pairs per row, which `mirotrain validate` prints from the manifest, :class:`PairsPerRow`), or exactly
one with the config's ``one_pair_per_row`` (MiroTrain's meaning of ``batch_size``; the plan is made in
:func:`mirotrain.data.pack_shards.pack`).

Row layout (one Arrow row per pack, all lists)::

    input_ids      int32 [T]   segments back to back: c_0, r_0, c_1, r_1, ... (T <= packed_seq_len)
    labels         int32 [T]   shifted (labels[t] = target of position t), -100 outside the responses
    position_ids   int32 [T]   restart at 0 in every segment
    seq_lens       int32 [S]   segment lengths, S = 2 * P
    pair_ids       int64 [P]   global pair id (the source sample index) -> joins added per-pair columns
    chosen_index   int32 [P]   segment index (into seq_lens) of pair p's chosen response
    rejected_index int32 [P]   segment index of pair p's rejected response
    <extra>        float64 [P] optional per-pair columns, e.g. ``ref_chosen_logp`` / ``ref_rejected_logp``
                              (added by :func:`add_pair_columns` after the reference pass)

Each segment is a full document (prompt + response); attention never crosses segments (``cu_seqlens``).
The per-segment sum of token log-probs over positions with ``labels != -100`` is the sequence log-prob
(:func:`segment_sums` computes it from per-token values). Rows are padded by the collate exactly like SFT
rows: a separate padding segment with labels -100 that no pair points to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mirotrain.data.packing import concat_documents
from mirotrain.data.shards import ShardReader, read_manifest, write_rows

DPO_COLUMNS: dict[str, Any] = {
    "input_ids": np.int32,
    "labels": np.int32,
    "position_ids": np.int32,
    "seq_lens": np.int32,
    "pair_ids": np.int64,
    "chosen_index": np.int32,
    "rejected_index": np.int32,
}
PAIR_COLUMNS = ("pair_ids", "chosen_index", "rejected_index")


def build_dpo_row(pairs: list[tuple[int, Any]]) -> dict[str, np.ndarray]:
    """Row from ``[(pair_id, EncodedPair), ...]`` in the layout above: pair p's chosen document is segment
    2p and its rejected document segment 2p + 1."""
    row = concat_documents([doc for _, enc in pairs for doc in (enc.chosen, enc.rejected)])
    row["input_ids"] = row["input_ids"].astype(np.int32)
    row["labels"] = row["labels"].astype(np.int32)
    row["pair_ids"] = np.asarray([pair_id for pair_id, _ in pairs], dtype=np.int64)
    row["chosen_index"] = np.arange(0, 2 * len(pairs), 2, dtype=np.int32)
    row["rejected_index"] = np.arange(1, 2 * len(pairs), 2, dtype=np.int32)
    return row


def pair_row_stats(plan: Sequence[Sequence[int]]) -> dict[str, int]:
    """What `mirotrain pack` records in a DPO manifest about its rows' pairs (``plan``: the pairs of each row):
    the pair count and the fewest and most pairs in a row (the mean is ``pairs / rows``)."""
    per_row = [len(row) for row in plan]
    return {"pairs": sum(per_row), "pairs_per_row_min": min(per_row), "pairs_per_row_max": max(per_row)}


@dataclass(frozen=True)
class PairsPerRow:
    """How many pairs the rows of a DPO shard directory hold: an optimizer step trains rows, so its pair count
    is rows per step × pairs per row (`mirotrain validate` prints it)."""

    pairs: int
    rows: int
    fewest: int | None  # None: shards packed before the manifest recorded it
    most: int | None

    @property
    def mean(self) -> float:
        return self.pairs / self.rows

    @classmethod
    def of(cls, manifest: Mapping) -> "PairsPerRow":
        """From a DPO manifest; one written before ``pairs`` was recorded counts its pairs as ``docs``."""
        if manifest.get("kind") != "dpo":
            raise ValueError(f"a {manifest.get('kind')!r} shard directory holds no preference pairs")
        return cls(int(manifest.get("pairs", manifest["docs"])), int(manifest["rows"]),
                   manifest.get("pairs_per_row_min"), manifest.get("pairs_per_row_max"))


def extra_pair_columns(manifest: Mapping) -> list[str]:
    """Per-pair columns added after packing (e.g. reference log-probs)."""
    return list(manifest.get("extra_pair_columns", []))


def read_dpo_row(row: Mapping[str, np.ndarray], extra: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one DPO row: token columns [T], ``seq_lens`` [S], per-pair columns [P] (extras as float64)."""
    out: dict[str, torch.Tensor] = {}
    for name in ("input_ids", "labels", "position_ids", "seq_lens", "chosen_index", "rejected_index", "pair_ids"):
        out[name] = torch.from_numpy(np.array(row[name], dtype=np.int64))
    for name in extra if extra is not None else [c for c in row if c not in DPO_COLUMNS]:
        out[name] = torch.from_numpy(np.array(row[name], dtype=np.float64))
    return out


class DPOShardReader(ShardReader):
    """:class:`ShardReader` that returns :func:`read_dpo_row` tensors and knows the added per-pair columns."""

    def __init__(self, shard_dir: str):
        super().__init__(shard_dir)
        if self.manifest.get("kind") != "dpo":
            raise ValueError(f"{shard_dir} holds {self.manifest.get('kind')!r} rows, not DPO pairs")
        self.extra_columns = extra_pair_columns(self.manifest)

    def pair_row(self, i: int) -> dict[str, torch.Tensor]:
        return read_dpo_row(self.row(i), self.extra_columns)


def add_pair_columns(src_dir: str, dst_dir: str, values: Mapping[str, np.ndarray | torch.Tensor]) -> dict:
    """Write a copy of a DPO shard directory with new per-pair float columns.

    ``values[name]`` is indexed by ``pair_id`` (length >= max pair id + 1), e.g. the reference model's
    ``ref_chosen_logp`` for every pair. Rows, order and existing columns are unchanged; the manifest lists the
    new names under ``extra_pair_columns`` and records the parent directory.
    """
    reader = ShardReader(src_dir)
    manifest = dict(reader.manifest)
    if manifest.get("kind") != "dpo":
        raise ValueError(f"{src_dir} is not a DPO shard directory")
    arrays = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.float64) for k, v in values.items()}
    for k, v in arrays.items():
        if k in DPO_COLUMNS:
            raise ValueError(f"cannot overwrite the core column {k!r}")
        if v.ndim != 1:
            raise ValueError(f"column {k!r} must be 1-D (one value per pair id), got shape {v.shape}")
    columns = {c: np.dtype(t) for c, t in manifest["columns"].items()}
    for k in arrays:
        columns[k] = np.dtype(np.float64)

    def rows():
        for row in reader:
            pid = row["pair_ids"]
            out = {c: np.asarray(row[c]) for c in row}
            for k, v in arrays.items():
                if len(pid) and int(pid.max()) >= len(v):
                    raise ValueError(f"column {k!r} has {len(v)} values but pair id {int(pid.max())} exists")
                out[k] = v[pid]
            yield out

    manifest["extra_pair_columns"] = sorted(set(extra_pair_columns(manifest)) | set(arrays))
    manifest["parent"] = src_dir
    rows_per_shard = max(s["rows"] for s in manifest["shards"]) if manifest["shards"] else 1
    return write_rows(dst_dir, rows(), columns, {k: v for k, v in manifest.items() if k not in ("shards", "columns")}, rows_per_shard)


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum a per-token tensor ``[T]`` over each segment of ``cu_seqlens`` -> ``[S]`` (fp32/fp64 kept)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lens), device=values.device), lens.to(values.device))
    out = torch.zeros(len(lens), dtype=values.dtype, device=values.device)
    return out.index_add_(0, seg, values[: int(cu_seqlens[-1])])


__all__ = ["DPO_COLUMNS", "DPOShardReader", "PairsPerRow", "add_pair_columns", "build_dpo_row", "extra_pair_columns",
           "pair_row_stats", "read_dpo_row", "read_manifest", "segment_sums"]
