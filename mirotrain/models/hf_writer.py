"""The one writer of Hugging Face model directories: sharded safetensors + index, config.json, tokenizer files.

Both exports use it: the trainer's in-training export (``save_pretrained``, tensors gathered from FSDP one at a
time) and ``mirotrain convert`` (tensors streamed from a DCP step checkpoint). Tensors arrive one at a time
in HF order and are appended to the current shard, which is written once adding the next tensor would pass
``max_shard_size``; so at most one shard is held in memory.

The directory is built as ``OUT.tmp`` and only then put in place, in three steps: the previous export is
renamed aside to ``OUT.old``, ``OUT.tmp`` is renamed to ``OUT``, and ``OUT.old`` is deleted. ``OUT`` is thus
never half written, and the previous export stays complete until the new one is in place: if the second
rename fails, the previous export is renamed back; if the process dies between the two renames, ``OUT`` is
absent and ``OUT.old`` complete, and the next writer of ``OUT`` renames it back before it starts. Everything in it is made readable by other users (files
0644, directories 0755, and the same for parent directories the writer creates) whatever the process umask,
because the exports are read by serving processes that run as other users.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import save_file

FILE_MODE = 0o644
DIR_MODE = 0o755
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", GENERATION_CONFIG, "chat_template.jinja")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``'5GB'`` / ``'500MiB'`` (binary units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB'")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def make_public_dirs(path: Path) -> None:
    """``mkdir -p path`` where every directory created here gets mode 0755 (existing ones are left alone)."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        os.chmod(p, DIR_MODE)


def _copy_present(src: str | os.PathLike, dst: str | os.PathLike, names: tuple[str, ...]) -> list[str]:
    """Copy the files of ``names`` that exist in ``src`` (local or fsspec URL) into ``dst``; returns their names."""
    fs, root = fsspec.core.url_to_fs(str(src))
    copied = []
    for name in names:
        path = f"{root.rstrip('/')}/{name}"
        if fs.isfile(path):
            fs.get(path, str(Path(dst) / name))
            copied.append(name)
    return copied


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer (and generation config) files that exist in ``src`` (local or fsspec URL)."""
    copied = _copy_present(src, dst, TOKENIZER_FILES)
    if "tokenizer_config.json" not in copied and "tokenizer.json" not in copied:
        raise FileNotFoundError(f"tokenizer directory {src} holds no tokenizer.json / tokenizer_config.json")
    return copied


class HFDirWriter:
    """Builds one HF model directory at ``out`` (see the module docstring): ``add`` every tensor, then ``finish``.

    Args:
        out: the directory to create (replaced if it exists).
        max_shard_size: bytes per safetensors shard (or a string such as ``'5GB'``).
    """

    def __init__(self, out: str | os.PathLike, max_shard_size: int | str = "5GB"):
        self.out = Path(out)
        self.limit = parse_size(max_shard_size)
        self.tmp = self.out.with_name(self.out.name + ".tmp")
        self.old = self.out.with_name(self.out.name + ".old")
        if self.old.exists() and not self.out.exists():  # a writer died between its two renames
            self.old.rename(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        make_public_dirs(self.tmp)
        self._shards: list[list[str]] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append HF tensor ``name`` (a contiguous CPU tensor) to the current shard."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.limit:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if self._buffer:
            part = self.tmp / f"part-{len(self._shards):05d}.safetensors"
            save_file(self._buffer, str(part), metadata={"format": "pt"})
            self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def finish(self, config: dict[str, Any], tokenizer_dir: str | os.PathLike | None,
               base_dir: str | os.PathLike | None = None) -> dict[str, str]:
        """Write the last shard, the index (when sharded), ``config.json`` and the tokenizer files; set the modes;
        move the directory into place. Returns the weight map (HF name -> file).

        ``base_dir`` (the base checkpoint) contributes its ``generation_config.json`` where it has one: it
        belongs to the model (its stop ids), so it wins over one in the tokenizer directory."""
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            (self.tmp / f"part-{i:05d}.safetensors").rename(self.tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, self.tmp)
        if base_dir is not None:
            _copy_present(base_dir, self.tmp, (GENERATION_CONFIG,))
        for f in self.tmp.iterdir():
            os.chmod(f, FILE_MODE)
        self._replace_out()
        return weight_map

    def _replace_out(self) -> None:
        """Put ``tmp`` in place of ``out`` (see the module docstring for the steps and what a failure leaves)."""
        shutil.rmtree(self.old, ignore_errors=True)
        had_previous = self.out.exists()
        if had_previous:
            self.out.rename(self.old)
        try:
            self.tmp.rename(self.out)
        except BaseException:
            if had_previous:
                self.old.rename(self.out)
            raise
        shutil.rmtree(self.old, ignore_errors=True)
