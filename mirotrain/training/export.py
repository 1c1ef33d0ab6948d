"""HF exports of a run: ``output_dir/hf/{name}`` with safetensors, config.json and the tokenizer files."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mirotrain.models.hf_writer import make_public_dirs

log = logging.getLogger("mirotrain.train")


@dataclass(frozen=True)
class HFExport:
    """Where and how a run exports: ``final`` always, ``epoch_{k}`` after each epoch with ``every_epoch``."""

    root: Path  # output_dir / "hf"
    tokenizer_dir: str | None
    max_shard_size: Any
    dtype: torch.dtype
    every_epoch: bool
    epochs: int

    def save(self, model: nn.Module, name: str, is_main: bool) -> Path:
        """Export ``model`` as ``root/name`` (all ranks must call; the caller finishes pending checkpoint writes
        first, so the gather does not overlap a background write)."""
        from mirotrain.models.hf_weights import save_pretrained

        out = self.root / name
        save_pretrained(model, out, tokenizer_dir=self.tokenizer_dir, max_shard_size=self.max_shard_size,
                        dtype=self.dtype)
        if is_main:
            log.info("Saved HF weights to %s", out)
            if name == "final" and self.every_epoch and self.epochs > 0:
                _link_tree(out, self.root / f"epoch_{self.epochs - 1}")
        dist.barrier()
        return out


def _link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` by hard links (no extra disk), falling back to copies."""
    if dst.exists():
        shutil.rmtree(dst)
    make_public_dirs(dst)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
