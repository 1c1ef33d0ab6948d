"""Rows -> the typed batches the model eats (:mod:`mirotrain.data.batch`).

Packed rows (B = 1): ``input_ids``/``labels``/``position_ids`` ``[1, T]``, ``cu_seqlens`` int32 ``[n+1]``,
``max_seqlen`` int. Rows are padded to a fixed ``T = packed_seq_len`` (constant shapes for compiled kernels)
and the padding is its **own segment**: pad token = the tokenizer's pad id, labels -100, position ids
restarting at 0 -- never merged into the last document's varlen segment, so no real token attends to
padding and padded positions never exceed the RoPE range.
Several packed rows given at once are concatenated into one ``[1, sum T]`` row (segments stay separate).

Unpacked rows (B >= 1): right padded ``[B, T]`` with pad id / -100, no ``cu_seqlens``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mirotrain.data.batch import IGNORE_INDEX, PreferenceBatch, SFTBatch


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _pack_arrays(rows: Sequence[Mapping[str, Any]], pad_id: int, packed_seq_len: int | None) -> dict[str, np.ndarray]:
    ids, labels, pos, lens, mask = [], [], [], [], []
    for row in rows:
        r_ids = _np(row["input_ids"]).astype(np.int64)
        mask.append(np.ones(len(r_ids), dtype=np.bool_))
        r_lens = _np(row["seq_lens"]).astype(np.int64)
        ids.append(r_ids)
        labels.append(_np(row["labels"]).astype(np.int64))
        pos.append(_np(row["position_ids"]).astype(np.int64) if "position_ids" in row
                   else np.concatenate([np.arange(n) for n in r_lens]) if len(r_lens) else np.zeros(0, np.int64))
        lens.append(r_lens)
        if int(r_lens.sum()) != len(r_ids):
            raise ValueError(f"row seq_lens sum {int(r_lens.sum())} != {len(r_ids)} tokens")
        if packed_seq_len is not None:
            pad = packed_seq_len - len(r_ids)
            if pad < 0:
                raise ValueError(f"row of {len(r_ids)} tokens exceeds packed_seq_len={packed_seq_len}")
            if pad:
                ids.append(np.full(pad, pad_id, dtype=np.int64))
                labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
                pos.append(np.arange(pad, dtype=np.int64))
                lens.append(np.asarray([pad], dtype=np.int64))
                mask.append(np.zeros(pad, dtype=np.bool_))
    return {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels), "position_ids": np.concatenate(pos),
            "seq_lens": np.concatenate(lens), "token_mask": np.concatenate(mask)}


def collate_packed(rows: Sequence[Mapping[str, Any]], pad_id: int = 151643, packed_seq_len: int | None = None) -> SFTBatch:
    """Packed rows -> one ``[1, T]`` varlen batch with ``cu_seqlens``; padding is a separate segment and
    ``token_mask`` is False on it (MoE router statistics leave padding out, as HF's ``attention_mask`` does)."""
    a = _pack_arrays(rows, pad_id, packed_seq_len)
    lens = a["seq_lens"]
    cu = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    return SFTBatch(
        input_ids=torch.from_numpy(a["input_ids"]).unsqueeze(0),
        labels=torch.from_numpy(a["labels"]).unsqueeze(0),
        position_ids=torch.from_numpy(a["position_ids"]).unsqueeze(0),
        token_mask=torch.from_numpy(a["token_mask"]).unsqueeze(0),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lens.max()) if len(lens) else 0,
    )


def padded_collate_sft(rows: Sequence[Mapping[str, Any]], pad_id: int = 151643) -> SFTBatch:
    """Unpacked rows -> right-padded ``[B, T]`` (``labels`` are already shifted, as our rows are)."""
    ids = [_np(r["input_ids"]).astype(np.int64) for r in rows]
    labels = [_np(r["labels"]).astype(np.int64) for r in rows]
    T = max(len(x) for x in ids)
    out_ids = np.full((len(ids), T), pad_id, dtype=np.int64)
    out_labels = np.full((len(ids), T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(ids), T), dtype=np.bool_)
    for i, (x, y) in enumerate(zip(ids, labels)):
        out_ids[i, : len(x)] = x
        out_labels[i, : len(y)] = y
        mask[i, : len(x)] = True
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (len(ids), T)).copy()
    return SFTBatch(input_ids=torch.from_numpy(out_ids), labels=torch.from_numpy(out_labels),
                    position_ids=torch.from_numpy(pos), token_mask=torch.from_numpy(mask))


def padded_collate_dpo(rows: Sequence[Mapping[str, Any]], pad_id: int = 151643, packed_seq_len: int | None = None,
                       extra_columns: Sequence[str] | None = None) -> PreferenceBatch:
    """DPO rows (layout in :mod:`mirotrain.data.preference`) -> one varlen batch plus per-pair indices.

    ``chosen_index``/``rejected_index`` ``[P]`` are segment indices into ``cu_seqlens`` (offset for
    concatenated rows); ``extra_columns`` (default: the rows' ``ref_*`` columns) become ``pair_columns``.
    """
    tokens = collate_packed(rows, pad_id=pad_id, packed_seq_len=packed_seq_len)
    chosen, rejected, pair_ids = [], [], []
    extras: dict[str, list] = {}
    names = list(extra_columns) if extra_columns is not None else None
    seg_offset = 0
    for row in rows:
        chosen.append(_np(row["chosen_index"]).astype(np.int64) + seg_offset)
        rejected.append(_np(row["rejected_index"]).astype(np.int64) + seg_offset)
        pair_ids.append(_np(row["pair_ids"]).astype(np.int64))
        cols = names if names is not None else [k for k in row if k.startswith("ref_")]
        for k in cols:
            extras.setdefault(k, []).append(_np(row[k]).astype(np.float64))
        n_seg = len(_np(row["seq_lens"]))
        pad = 0 if packed_seq_len is None else int(packed_seq_len - len(_np(row["input_ids"])))
        seg_offset += n_seg + (1 if pad > 0 else 0)
    return PreferenceBatch(
        **tokens.token_fields(),
        chosen_index=torch.from_numpy(np.concatenate(chosen)),
        rejected_index=torch.from_numpy(np.concatenate(rejected)),
        pair_ids=torch.from_numpy(np.concatenate(pair_ids)),
        pair_columns={k: torch.from_numpy(np.concatenate(v)) for k, v in extras.items()},
    )


def padding_row(pad_id: int, length: int = 1) -> dict[str, np.ndarray]:
    """An all-padding row (no trained token) for ranks that ran out of real rows (see the loader)."""
    return {"input_ids": np.full(length, pad_id, dtype=np.int32), "labels": np.full(length, IGNORE_INDEX, dtype=np.int32),
            "position_ids": np.arange(length, dtype=np.int32), "seq_lens": np.asarray([length], dtype=np.int32)}


def padding_dpo_row(pad_id: int, length: int = 1) -> dict[str, np.ndarray]:
    """An all-padding DPO row: no pairs."""
    row = padding_row(pad_id, length)
    row.update({"pair_ids": np.zeros(0, np.int64), "chosen_index": np.zeros(0, np.int32), "rejected_index": np.zeros(0, np.int32)})
    return row
