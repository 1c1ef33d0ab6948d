"""Packing: which documents share a row (:func:`plan_packs`) and how a row is laid out (:func:`sft_row`).

Both packers use this module: the offline writer behind ``mirotrain pack`` (:mod:`mirotrain.data.pack_shards`)
and the streaming loader (:mod:`mirotrain.data.streaming`); DPO rows put each pair's two documents back to
back with :func:`concat_documents` (:func:`mirotrain.data.preference.build_dpo_row`).

Algorithm: **best-fit decreasing** with a seeded tie-break.
1. Documents are shuffled with ``seed`` and then stably sorted by length, longest first.
2. Each document goes into the open row with the *least* free space that still fits it (best fit); if none
   fits, a new row is opened. Free-space lookup is a segment tree over the possible free sizes
   ``0..packed_seq_len``, so one placement costs O(log L) whatever the number of open rows.
3. The finished rows are shuffled with ``seed`` (so long-document rows are not all at the start).
Documents are never split across rows. With agent-trace length mixes (many docs well below L) BFD leaves
well under 2% padding, where a greedy "append until the next one does not fit" packer (:func:`greedy_packs`,
the baseline of benchmarks/pack.py) leaves about half a mean document length per row.

Determinism: the output depends only on ``lengths``, ``capacity`` and ``seed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from mirotrain.data.datasets import Encoded

# Columns of an SFT row (shards written by `mirotrain pack`; see mirotrain/data/shards.py).
SFT_COLUMNS: dict[str, Any] = {
    "input_ids": np.int32,
    "labels": np.int32,
    "position_ids": np.int32,
    "seq_lens": np.int32,
    "doc_index": np.int64,
}


class _FreeSizeTree:
    """Set of integers in ``[0, n)`` with 'smallest member >= x' in O(log n)."""

    def __init__(self, n: int):
        size = 1
        while size < n:
            size *= 2
        self.size = size
        self.t = [0] * (2 * size)

    def add(self, v: int) -> None:
        i = v + self.size
        while i and self.t[i] == 0:  # mark the leaf and every ancestor not yet marked
            self.t[i] = 1
            i >>= 1

    def remove(self, v: int) -> None:
        i = v + self.size
        self.t[i] = 0
        i >>= 1
        while i and self.t[2 * i] == 0 and self.t[2 * i + 1] == 0:
            self.t[i] = 0
            i >>= 1

    def first_at_least(self, x: int) -> int | None:
        t, size = self.t, self.size
        if x >= size:
            return None
        i = x + size
        if t[i]:
            return x
        while i > 1:
            if not (i & 1) and t[i + 1]:
                i += 1
                break
            i >>= 1
        else:
            return None
        while i < size:
            i = 2 * i if t[2 * i] else 2 * i + 1
        return i - size


def plan_packs(lengths: Sequence[int] | np.ndarray, capacity: int, seed: int = 0) -> list[list[int]]:
    """Group document indices into rows whose total length is <= ``capacity`` (see module docstring)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    if int(lengths.max()) > capacity:
        bad = int(np.argmax(lengths))
        raise ValueError(f"document {bad} has {int(lengths[bad])} tokens, more than packed_seq_len={capacity}")
    if int(lengths.min()) <= 0:
        raise ValueError("documents must have at least one token")
    rng = np.random.default_rng(seed)
    order = rng.permutation(lengths.size)
    order = order[np.argsort(-lengths[order], kind="stable")]
    tree = _FreeSizeTree(capacity + 1)
    by_free: dict[int, list[int]] = {}
    bins: list[list[int]] = []
    for idx in order.tolist():
        n = int(lengths[idx])
        free = tree.first_at_least(n)
        if free is None:
            b = len(bins)
            bins.append([idx])
            left = capacity - n
        else:
            stack = by_free[free]
            b = stack.pop()
            if not stack:
                tree.remove(free)
            bins[b].append(idx)
            left = free - n
        if left > 0:
            stack = by_free.setdefault(left, [])
            if not stack:
                tree.add(left)
            stack.append(b)
    perm = rng.permutation(len(bins))
    return [bins[p] for p in perm.tolist()]


def greedy_packs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sequential 'append until the next one does not fit' packing (the baseline in benchmarks)."""
    bins: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if cur and used + n > capacity:
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        bins.append(cur)
    return bins


def concat_documents(docs: Sequence["Encoded"]) -> dict[str, np.ndarray]:
    """Documents back to back: ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 in every
    document) and ``seq_lens`` (one length per document; their sum is the row length)."""
    return {
        "input_ids": np.concatenate([d.input_ids for d in docs]),
        "labels": np.concatenate([d.labels for d in docs]),
        "position_ids": np.concatenate([np.arange(len(d), dtype=np.int32) for d in docs]),
        "seq_lens": np.asarray([len(d) for d in docs], dtype=np.int32),
    }


def sft_row(docs: Sequence[tuple[int, "Encoded"]]) -> dict[str, np.ndarray]:
    """An SFT row (:data:`SFT_COLUMNS`) from ``[(source sample index, document), ...]``."""
    row = concat_documents([d for _, d in docs])
    row["doc_index"] = np.asarray([i for i, _ in docs], dtype=np.int64)
    return row
