"""Arrow shard directories: writer, memory-mapped reader, ``manifest.json``.

Layout of a shard directory (any fsspec URL)::

    manifest.json           written last: its presence means the directory is complete
    shard-00000.arrow       Arrow IPC file, one record batch, one row per pack
    shard-00001.arrow ...

Columns are Arrow ``list<int32>`` (token data) or ``list<int64>``/``list<float64>`` (per-document or
per-pair values). SFT rows: ``input_ids``, ``labels`` (already shifted; -100 = ignored), ``position_ids``
(restart at 0 per document), ``seq_lens`` (document lengths, sum = row length; no padding is stored --
the collate pads each row to ``packed_seq_len`` with a separate padding segment), ``doc_index`` (source
sample index of each document). DPO rows: see :mod:`mirotrain.data.preference`.

Local shards are opened with ``pyarrow.memory_map`` (pages are shared between the ranks of a node and
nothing is copied until a row is read); remote shards are read into memory once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def read_manifest(shard_dir: str) -> dict:
    """The manifest of a shard directory (FileNotFoundError if the directory is not complete)."""
    with fsspec.open(join(shard_dir, MANIFEST), "rt") as f:
        return json.load(f)


def manifest_exists(shard_dir: str) -> bool:
    fs, path = fsspec.core.url_to_fs(join(shard_dir, MANIFEST))
    return fs.exists(path)


def _list_type(values: np.ndarray) -> pa.DataType:
    if values.dtype.kind == "f":
        return pa.float64()
    if values.dtype == np.int64:
        return pa.int64()
    return pa.int32()


def _list_array(rows: list[np.ndarray], dtype: np.dtype) -> pa.Array:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(rows).astype(dtype, copy=False) if rows else np.zeros(0, dtype=dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(flat))


class ShardWriter:
    """Write rows (dicts of 1-D numpy arrays) into ``shard-NNNNN.arrow`` files of ``rows_per_shard`` rows."""

    def __init__(self, out_dir: str, columns: dict[str, np.dtype], rows_per_shard: int = 1024):
        self.out_dir = out_dir.rstrip("/")
        self.columns = dict(columns)
        self.rows_per_shard = max(1, int(rows_per_shard))
        self._buf: list[dict[str, np.ndarray]] = []
        self.shards: list[dict] = []
        fs, path = fsspec.core.url_to_fs(self.out_dir)
        fs.makedirs(path, exist_ok=True)

    def add(self, row: dict[str, np.ndarray]) -> None:
        missing = set(self.columns) - set(row)
        if missing:
            raise KeyError(f"row lacks columns {sorted(missing)}")
        self._buf.append(row)
        if len(self._buf) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        arrays = [_list_array([r[c] for r in self._buf], dt) for c, dt in self.columns.items()]
        batch = pa.record_batch(arrays, names=list(self.columns))
        name = f"shard-{len(self.shards):05d}.arrow"
        url = join(self.out_dir, name)
        with fsspec.open(url, "wb") as f:
            with pa.ipc.new_file(f, batch.schema) as w:
                w.write_batch(batch)
        tokens = int(sum(len(r["input_ids"]) for r in self._buf)) if "input_ids" in self.columns else 0
        self.shards.append({"file": name, "rows": len(self._buf), "tokens": tokens})
        self._buf = []

    def close(self, manifest: dict) -> dict:
        """Flush and write ``manifest.json`` (last, so a crash never leaves a directory that looks complete)."""
        self._flush()
        manifest = dict(manifest)
        manifest.setdefault("schema_version", SCHEMA_VERSION)
        manifest["shards"] = self.shards
        manifest["rows"] = sum(s["rows"] for s in self.shards)
        manifest["columns"] = {c: np.dtype(dt).name for c, dt in self.columns.items()}
        with fsspec.open(join(self.out_dir, MANIFEST), "wt") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        return manifest


class _Shard:
    def __init__(self, url: str, names: list[str]):
        if _is_local(url):
            source = pa.memory_map(_local_path(url), "r")
        else:
            with fsspec.open(url, "rb") as f:
                source = pa.BufferReader(f.read())
        reader = pa.ipc.open_file(source)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        batch = batches[0] if len(batches) == 1 else pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
        self.rows = batch.num_rows
        self.cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in batch.schema.names:
            arr = batch.column(name)
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
            values = arr.values.to_numpy(zero_copy_only=True)
            self.cols[name] = (offsets, values)


class ShardReader:
    """Random access to the rows of a shard directory; rows are dicts of numpy arrays (views into the map).

    Extra columns (e.g. ``ref_chosen_logp`` added after the DPO reference pass) are exposed like any other.
    """

    def __init__(self, shard_dir: str):
        self.dir = shard_dir.rstrip("/")
        self.manifest = read_manifest(self.dir)
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{self.dir}: shard schema version {self.manifest.get('schema_version')} != {SCHEMA_VERSION}; re-run `mirotrain pack`")
        self._shards = [_Shard(join(self.dir, s["file"]), []) for s in self.manifest["shards"]]
        self._starts = np.cumsum([0] + [s.rows for s in self._shards])
        self.columns: list[str] = list(self._shards[0].cols) if self._shards else list(self.manifest.get("columns", {}))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range (0..{len(self) - 1})")
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        shard = self._shards[k]
        j = i - int(self._starts[k])
        out = {}
        for name, (offsets, values) in shard.cols.items():
            out[name] = values[offsets[j]:offsets[j + 1]]
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.row(i)


def write_rows(out_dir: str, rows: Iterable[dict[str, np.ndarray]], columns: dict[str, Any], manifest: dict, rows_per_shard: int = 1024) -> dict:
    """Write an iterable of rows as a complete shard directory; returns the manifest written."""
    w = ShardWriter(out_dir, columns, rows_per_shard)
    for r in rows:
        w.add(r)
    return w.close(manifest)


def remove_dir(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def local_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
