"""How a too-long sample is cut: the one place that decides.

A sample is rendered whole (:mod:`mirotrain.data.render`), then :meth:`Truncation.fit` applies the limit
once. The options come from the config's ``tokenizer`` section (``truncation_type``, ``on_overlong``), the
limit from the dataset (:meth:`mirotrain.data.datasets.SFTDataset.encode`: ``min(tokenizer.max_seq_len,
dataset.packed_seq_len)``; a preference document: ``tokenizer.max_seq_len``). Nothing is appended after a
cut: a right-truncated sample simply ends early (no forced eos whose mask would be wrong).

A preference pair must also fit one packed row as a whole (:meth:`Truncation.check_pair`); a pair that does
not is dropped whatever ``on_overlong`` says, since cutting a response would change what DPO compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TRUNCATION_TYPES = ("right", "left")
ON_OVERLONG = ("truncate", "drop")


class SampleTooLong(ValueError):
    """A sample longer than its limit under ``on_overlong='drop'`` (the datasets count it as dropped)."""

    def __init__(self, length: int, limit: int):
        self.length, self.limit = length, limit
        super().__init__(f"sample has {length} tokens, more than max_seq_len={limit}")


@dataclass(frozen=True)
class Truncation:
    """``side`` keeps the start (``right``: cut the end) or the end (``left``); ``on_overlong`` cuts or drops."""

    side: str = "right"
    on_overlong: str = "truncate"

    @classmethod
    def of(cls, tokenizer: Any) -> "Truncation":
        """The policy configured on a tokenizer (its ``truncation_type`` / ``on_overlong`` arguments)."""
        return cls(tokenizer.truncation_type, tokenizer.on_overlong)

    def fit(self, ids: list[int], mask: list[bool], limit: int | None) -> tuple[list[int], list[bool]]:
        """``(ids, mask)`` cut to ``limit`` tokens (``None``: no limit); raises :class:`SampleTooLong` on drop."""
        if limit is None or len(ids) <= limit:
            return ids, mask
        if self.on_overlong == "drop":
            raise SampleTooLong(len(ids), limit)
        if self.side == "right":
            return ids[:limit], mask[:limit]
        return ids[-limit:], mask[-limit:]

    @staticmethod
    def check_pair(chosen_len: int, rejected_len: int, limit: int | None) -> None:
        """A preference pair must fit one row of ``limit`` tokens, else it is dropped."""
        if limit is not None and chosen_len + rejected_len > limit:
            raise SampleTooLong(chosen_len + rejected_len, limit)
