"""Stateful distributed row sampler: disjoint rows per data-parallel rank, exact mid-epoch resume.

Per epoch the row order is a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)`` (or the
identity without shuffle); rank r takes positions ``r, r + R, r + 2R, ...``. Every rank gets
``ceil(N / R)`` items: ranks that run out get ``None`` (the loader turns it into an all-padding row with no
trained token), so every row is used exactly once per epoch and every rank runs the same number of steps
(no row is dropped or repeated to even things out). The state is ``(epoch, position, seed, num_rows,
dp_size)``; restoring it yields exactly the rest of the epoch. The seed is part of the state so a resumed run
never reshuffles with a different seed, even with ``seed: null`` (a fresh seed drawn per run).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch


class DistributedRowSampler:
    def __init__(self, num_rows: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True, seed: int = 0):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad data-parallel coordinates rank={dp_rank} size={dp_size}")
        self.num_rows, self.dp_rank, self.dp_size = int(num_rows), int(dp_rank), int(dp_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.epoch = 0
        self.position = 0  # items of this epoch already handed out on this rank

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.dp_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def epoch_items(self, epoch: int | None = None) -> list[int | None]:
        """This rank's items for an epoch, ``None`` marking a padding slot."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        mine: list[int | None] = list(order[self.dp_rank :: self.dp_size])
        mine += [None] * (len(self) - len(mine))
        return mine

    def __iter__(self) -> Iterator[int | None]:
        items = self.epoch_items()
        while self.position < len(items):
            item = items[self.position]
            self.position += 1
            yield item

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": self.num_rows,
                "dp_size": self.dp_size, "shuffle": self.shuffle}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("num_rows", "dp_size"):
            if int(sd[key]) != getattr(self, key):
                raise ValueError(f"cannot resume the data order: saved {key}={sd[key]}, now {getattr(self, key)} "
                                 "(resuming with different data or data-parallel size is not supported)")
        if int(sd["position"]) < 0 or int(sd["epoch"]) < 0:
            raise ValueError(f"bad sampler state {sd}")
        self.seed = int(sd["seed"])
        self.shuffle = bool(sd.get("shuffle", self.shuffle))
        self.epoch = int(sd["epoch"])
        self.position = int(sd["position"])
