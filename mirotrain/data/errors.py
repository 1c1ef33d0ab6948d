"""Data errors that say where the bad input is (file and line, or dataset and row) and what is wrong.

Training data is large and produced by other pipelines; an error without a location sends a user grepping
through gigabytes. Every error raised on a sample goes through :class:`DataError` with its ``where``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SampleFormatError(ValueError):
    """A sample's content is wrong (no location yet; the reader adds it)."""


class DataError(ValueError):
    """A bad sample, with its location: ``"data/sft.jsonl:17: assistant turn first (message 0)"``."""

    def __init__(self, where: str, message: str):
        self.where, self.reason = where, message
        super().__init__(f"{where}: {message}")
        self.args = (where, message)  # so it pickles back from tokenizer worker processes

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class SkipLog:
    """Counts of skipped (bad) and dropped (over-long) samples, with a few examples for the report.

    ``on_bad_sample: skip`` must never be silent: the counts go into the summary and the manifest.
    """

    skipped: int = 0
    dropped: int = 0
    truncated: int = 0
    filtered: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def skip(self, err: DataError) -> None:
        self.skipped += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def skip_message(self, message: str) -> None:
        self.skipped += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def merge(self, other: "SkipLog") -> None:
        self.skipped += other.skipped
        self.dropped += other.dropped
        self.truncated += other.truncated
        self.filtered += other.filtered
        for e in other.examples:
            if len(self.examples) < self.max_examples:
                self.examples.append(e)

    def as_dict(self) -> dict:
        return {"skipped": self.skipped, "dropped": self.dropped, "truncated": self.truncated, "filtered": self.filtered, "skip_examples": list(self.examples)}
