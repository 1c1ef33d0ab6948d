"""Reading Hugging Face checkpoint directories: local or fsspec URL, ``config.json`` and safetensors shards.

Weights are only ever read from safetensors, lazily and by row range: nothing here unpickles a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import safe_open


def _is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def localize(path_or_url: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local directory holding the checkpoint: the path itself, or a copy of a remote fsspec URL."""
    text = str(path_or_url)
    if not _is_remote(text):
        local = Path(text.removeprefix("file://"))
        if not local.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {local}")
        return local
    fs, root = fsspec.core.url_to_fs(text)
    if not fs.isdir(root):
        raise FileNotFoundError(f"checkpoint directory not found: {text}")
    target = Path(cache_dir or tempfile.mkdtemp(prefix="mirotrain-ckpt-"))
    target.mkdir(parents=True, exist_ok=True)
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if fs.isfile(entry) and not (target / name).exists():
            fs.get(entry, str(target / name))
    return target


def read_hf_config(path_or_url: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory or fsspec URL."""
    with fsspec.open(f"{str(path_or_url).rstrip('/')}/config.json", "r") as f:
        return json.load(f)


class SafetensorsReader:
    """Reads named tensors (or row ranges of them) from a directory of safetensors shards, lazily."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    weight_map.update({k: f.name for k in handle.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        if file not in self._handles:
            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in model.safetensors.index.json) is missing")
            self._handles[file] = safe_open(str(path), framework="pt")
        return self._handles[file]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name``, or rows ``[start, stop)`` of its dim 0."""
        sl = self._handle(name).get_slice(name)
        return sl[rows[0]:rows[1]] if rows is not None else sl[:]
