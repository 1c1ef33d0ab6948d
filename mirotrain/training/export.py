"""HF exports of a run: ``output_dir/hf/{name}`` with safetensors, config.json and the tokenizer files, and
``output_dir/epoch_{N}/``, where MiroTrain users' scripts look for the weights of epoch N.

``epoch_{N}/`` is a tree of hard links to the files of ``hf/epoch_{N}`` (``hf/final`` for the last epoch),
copies where the filesystem has no hard links. Hard links rather than a symlink: the directory holds plain
files, so ``from_pretrained`` (transformers, vLLM) and upload or sync tools that skip or mishandle symlinks
see a normal model directory; it takes no extra disk; it stays valid when the run directory is moved or
copied (a copy that does not keep hard links, such as ``cp -r``, duplicates the bytes); and it is a
snapshot: rewriting ``hf/final`` (a re-run of a finished run exports it again) replaces files by new ones
and re-links ``epoch_{N}``, so it never shows a half-written export.

An ``epoch_{N}/`` this trainer made holds a marker file (``EXPORT_MARK``); one without it (MiroTrain wrote its
epoch weights, and its step checkpoints, into the same directories of the same ``output_dir``) is never
touched: the export stays in ``hf/`` and a warning says so.
"""

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

from mirotrain.checkpoint.layout import EPOCH_DIR_RE, epoch_dir_name
from mirotrain.models.hf_writer import make_public_dirs

log = logging.getLogger("mirotrain.train")

# in every output_dir/epoch_{N}/ this trainer links: only those are ever replaced
EXPORT_MARK = ".mirotrain-export"


@dataclass(frozen=True)
class HFExport:
    """Where and how a run exports: ``final`` always, ``epoch_{k}`` after each epoch with ``every_epoch``.

    ``base_dir`` is the checkpoint training started from (``checkpointer.checkpoint_dir``; None: random
    initialisation): every export keeps its special token ids and its ``generation_config.json``.
    """

    output_dir: Path
    tokenizer_dir: str | None
    base_dir: str | None
    max_shard_size: Any
    dtype: torch.dtype
    every_epoch: bool
    epochs: int

    @property
    def root(self) -> Path:
        return self.output_dir / "hf"

    def epoch_of(self, name: str) -> int:
        """The epoch whose end export ``name`` is: ``epoch_{k}`` -> k, ``final`` -> the last epoch."""
        if name == "final":
            return self.epochs - 1
        match = EPOCH_DIR_RE.match(name)
        if match is None:
            raise ValueError(f"HF export name {name!r}: expected 'final' or 'epoch_<k>'")
        return int(match.group(1))

    def save(self, model: nn.Module, name: str, is_main: bool) -> Path:
        """Export ``model`` as ``root/name`` and link it as ``output_dir/epoch_{k}`` (all ranks must call; the
        caller finishes pending checkpoint writes first, so the gather does not overlap a background write)."""
        from mirotrain.models.hf_weights import save_pretrained

        epoch = self.epoch_of(name)
        out = self.root / name
        save_pretrained(model, out, tokenizer_dir=self.tokenizer_dir, max_shard_size=self.max_shard_size,
                        dtype=self.dtype, base_dir=self.base_dir)
        if is_main:
            log.info("Saved HF weights to %s", out)
            if name == "final" and self.every_epoch:
                link_tree(out, self.root / epoch_dir_name(epoch))
            link_epoch_dir(out, self.output_dir / epoch_dir_name(epoch))
        dist.barrier()
        return out


def link_epoch_dir(src: Path, dst: Path) -> None:
    """Link ``src`` as ``dst`` (``output_dir/epoch_{N}``) unless ``dst`` exists and is not this trainer's."""
    if dst.exists() and not (dst / EXPORT_MARK).is_file():
        log.warning("%s was not written by this trainer (MiroTrain's epoch weights or step checkpoints?): left as "
                    "it is; this epoch's HF export is %s", dst, src)
        return
    link_tree(src, dst, mark=True)


def link_tree(src: Path, dst: Path, mark: bool = False) -> None:
    """Make ``dst`` hold the files of ``src`` as hard links (copies where hard links fail), plus ``EXPORT_MARK``
    with ``mark``. Built as ``dst.tmp`` and renamed into place (the previous ``dst`` is renamed aside first,
    then deleted), so ``dst`` is absent only between the two renames."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_public_dirs(tmp)
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    if mark:
        (tmp / EXPORT_MARK).write_text(f"hard links to {src}\n")
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
