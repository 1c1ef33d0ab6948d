"""Streaming pack (``streaming_pack: True``): pack while training, with an exact step count up front.

Startup (a length pass): every process tokenises only its 1/W share of the samples (``i % W == rank`` over
the W processes of the job, or all samples when there is no process group) and the lengths are all-gathered.
From the lengths alone, each epoch's pack plan is fixed before the first step: the samples are packed with
:func:`mirotrain.data.packing.plan_packs` seeded with ``seed + epoch`` and pack k goes to data-parallel rank
``k % R``. So ``steps_per_epoch = ceil(packs / R)`` is exact, not an estimate, and the LR schedule built on
it ends where training ends; ranks with one pack less get an all-padding row.

Training: a rank tokenises only the samples of its own packs, when it reaches them. The state is
``(epoch, position)`` plus the seed; the plan is a pure function of them, so resume is exact.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from mirotrain.data.datasets import SFTDataset
from mirotrain.data.errors import DataError
from mirotrain.data.packing import plan_packs, sft_row


def _dist_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover
        pass
    return 0, 1


def length_pass(ds: SFTDataset, records: list[tuple[Any, str]]) -> tuple[np.ndarray, dict]:
    """Token length of every sample (0 = unusable: dropped, skipped or filtered), shared by all processes."""
    rank, world = _dist_world()
    lengths = np.zeros(len(records), dtype=np.int64)
    counts = {"dropped": 0, "skipped": 0, "filtered": 0, "truncated": 0}
    for i in range(rank, len(records), world):
        rec, where = records[i]
        status, value = ds.encode_or_report(rec, where)
        if status == "ok":
            lengths[i] = len(value)
            counts["truncated"] += int(value.truncated)
        else:
            counts[{"drop": "dropped", "skip": "skipped", "filter": "filtered"}[status]] += 1
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (lengths, counts))
        lengths = np.sum([g[0] for g in gathered], axis=0)
        counts = {k: sum(g[1][k] for g in gathered) for k in counts}
    return lengths, counts


class StreamingPacker:
    """The per-epoch pack plan and the rows of one data-parallel rank."""

    def __init__(self, ds: SFTDataset, dp_rank: int, dp_size: int, seed: int):
        self.ds = ds
        self.L = int(ds.options.packed_seq_len)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, int(seed)
        self.records = ds.records()
        self.lengths, self.counts = length_pass(ds, self.records)
        self.valid = np.flatnonzero(self.lengths > 0)
        if self.valid.size == 0:
            raise DataError(ds.origin(), f"no usable samples ({self.counts})")
        self._plan_epoch: int | None = None
        self._plan: list[list[int]] = []
        # BFD processes lengths longest first; the seed only permutes equal lengths, so the number of packs
        # (and steps) is the same every epoch. The epoch seed reorders packs and their rank assignment.
        self.steps_per_epoch = len(self.rank_packs(0))

    def packs(self, epoch: int) -> list[list[int]]:
        """All packs of an epoch, as lists of sample indices (same on every rank)."""
        if self._plan_epoch != epoch:
            local = plan_packs(self.lengths[self.valid], self.L, seed=self.seed + epoch)
            self._plan = [[int(self.valid[k]) for k in p] for p in local]
            self._plan_epoch = epoch
        return self._plan

    def rank_packs(self, epoch: int) -> list[list[int] | None]:
        packs = self.packs(epoch)
        per_rank = math.ceil(len(packs) / self.dp_size)
        mine: list[list[int] | None] = list(packs[self.dp_rank :: self.dp_size])
        return mine + [None] * (per_rank - len(mine))

    def build_row(self, pack: list[int]) -> dict[str, np.ndarray]:
        docs = []
        for i in pack:
            rec, where = self.records[i]
            status, enc = self.ds.encode_or_report(rec, where)
            if status != "ok" or len(enc) != self.lengths[i]:
                raise RuntimeError(f"{where}: sample changed between the length pass and training")
            docs.append((i, enc))
        return sft_row(docs)

    def iter_rows(self, epoch: int, start: int) -> Iterator[dict[str, np.ndarray] | None]:
        for pack in self.rank_packs(epoch)[start:]:
            yield None if pack is None else self.build_row(pack)
