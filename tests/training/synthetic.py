"""A data loader built in the test (the data contract of docs/contracts.md) over random token rows.

Global micro-batch ``g`` of epoch ``e`` is drawn from a generator seeded with (seed, e, g) and data-parallel
rank ``r`` of ``R`` reads ``g = i·R + r`` for its i-th micro-batch, so a step sees the same global batch for
any number of ranks: 1 rank with accumulation 2 trains on exactly what 2 ranks with accumulation 1 do.
Packed rows carry several documents (``cu_seqlens``), random prompt masks and restarted position ids.
"""

from __future__ import annotations

from typing import Iterator

import torch

IGNORE = -100


def make_row(vocab: int, seq_len: int, seed: int, packed: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    labels = torch.randint(0, vocab, (1, seq_len), generator=g)
    masked = torch.rand(1, seq_len, generator=g) < 0.3
    labels[masked] = IGNORE
    if not packed:
        return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq_len)[None]}
    n_docs = int(torch.randint(1, 4, (1,), generator=g))
    cuts = sorted(torch.randperm(seq_len - 1, generator=g)[: n_docs - 1].add(1).tolist())
    bounds = [0, *cuts, seq_len]
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None]
    for b in bounds[1:]:
        labels[0, b - 1] = IGNORE  # no target across a document boundary
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32), "max_seqlen": max(lens)}


class SyntheticLoader:
    def __init__(self, vocab: int, seq_len: int, micro_per_epoch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, packed: bool = True, rows: int = 1, distinct: int | None = None):
        self.vocab, self.seq_len, self.n = vocab, seq_len, micro_per_epoch
        self.dp_rank, self.dp_size, self.seed, self.packed, self.rows = dp_rank, dp_size, seed, packed, rows
        self.distinct = distinct  # cycle through this many distinct global batches (overfitting tests)
        self.epoch, self.position, self._resumed = 0, 0, False

    @property
    def steps_per_epoch(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        if self._resumed and epoch == self.epoch:
            self._resumed = False
            return
        self._resumed = False
        self.epoch, self.position = epoch, 0

    def batch(self, epoch: int, index: int) -> dict:
        g = index * self.dp_size + self.dp_rank
        if self.distinct:
            g, epoch = g % self.distinct, 0
        rows = [make_row(self.vocab, self.seq_len, hash((self.seed, epoch, g, r)) % 2**31, self.packed)
                for r in range(self.rows)]
        if len(rows) == 1:
            return rows[0]
        return {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}

    def __iter__(self) -> Iterator[dict]:
        self._resumed = False
        while self.position < self.n:
            b = self.batch(self.epoch, self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.position, self._resumed = int(sd["epoch"]), int(sd["position"]), True
