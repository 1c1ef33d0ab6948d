"""Supervised fine-tuning: the shared :class:`~mirotrain.training.trainer.Trainer` with its default loss step
(chunked linear cross-entropy over the trained tokens of packed or padded rows)."""

from __future__ import annotations

from typing import Any

from mirotrain.training.trainer import Trainer


class SFTTrainer(Trainer):
    """SFT recipe (the base loop's loss step is already SFT's; this names the recipe)."""

    recipe = "sft"


def run_sft(cfg: dict, **loaders: Any) -> dict[str, Any]:
    """Train per ``cfg``; returns the run summary (see docs/contracts.md)."""
    return SFTTrainer(cfg, **loaders).train()
