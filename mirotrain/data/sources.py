"""Raw records from JSON, JSONL or Parquet on any fsspec URL, or from a Hugging Face dataset.

We read JSON/JSONL/Parquet ourselves (rather than through ``datasets``) so every record keeps its location
(``file:line`` or ``file row N``) for error messages, and so ``memory://``/``s3://`` URLs work without a cache
copy. Anything else (``source: org/name``, ``csv``, ...) goes through ``datasets.load_dataset`` and is
located as ``dataset[split] row N``.
"""

from __future__ import annotations

import hashlib
import json
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

from mirotrain.data.errors import DataError

LOCAL_FORMATS = ("json", "jsonl", "parquet")


def _as_list(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):  # HF style {"train": [...]} -> all files of all splits listed
        out: list[str] = []
        for v in data_files.values():
            out += _as_list(v)
        return out
    return [str(f) for f in data_files]


@dataclass
class SourceSpec:
    """Where the raw samples come from. ``source`` is a format (json/jsonl/parquet) or an HF dataset id."""

    source: str
    data_files: Any = None
    split: str = "train"
    field: str | None = None  # JSON: key holding the list of records in a top-level object
    load_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def is_local_format(self) -> bool:
        return self.source in LOCAL_FORMATS

    def expand_files(self) -> list[str]:
        """Concrete file URLs (globs expanded), sorted for determinism, keeping the protocol."""
        files: list[str] = []
        for pattern in _as_list(self.data_files):
            fs, _, paths = fsspec.get_fs_token_paths(pattern)
            if not paths:
                raise FileNotFoundError(f"no file matches data_files {pattern!r}")
            proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
            for p in sorted(paths):
                files.append(p if proto in ("file", "local") else f"{proto}://{p}" if "://" not in p else p)
        return files

    def fingerprint(self) -> str:
        """Cheap identity of the inputs: file URLs + size + modification time/etag, or the HF dataset id."""
        h = hashlib.sha256()
        h.update(json.dumps([self.source, self.split, self.field, sorted(self.load_kwargs.items(), key=str)], default=str).encode())
        if self.is_local_format:
            for url in self.expand_files():
                fs, path = fsspec.core.url_to_fs(url)
                info = fs.info(path)
                stamp = [info.get(k) for k in ("size", "mtime", "ETag", "etag", "LastModified", "created", "md5")]
                if fs.protocol in ("memory",) or "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
                    with fs.open(path, "rb") as f:  # memory files have no mtime: hash content (tests only)
                        stamp.append(hashlib.sha256(f.read()).hexdigest())
                h.update(json.dumps([url, stamp], default=str).encode())
        else:
            h.update(json.dumps(_as_list(self.data_files)).encode())
        return h.hexdigest()


def _iter_json_file(url: str, field_name: str | None) -> Iterator[tuple[Any, str]]:
    """A JSON array (or object with ``field``) or JSON Lines; the format is sniffed from the content."""
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    whole: Any = None
    if stripped.startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{url}:{exc.lineno}", f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    elif stripped.startswith("{") and field_name is not None:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{url}:{exc.lineno}", f"malformed JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(whole, dict) or field_name not in whole:
            raise DataError(url, f"JSON object has no field {field_name!r}")
        whole = whole[field_name]
    if whole is not None:
        if not isinstance(whole, list):
            raise DataError(url, f"expected a JSON list of samples, got {type(whole).__name__}")
        for i, rec in enumerate(whole):
            yield rec, f"{url} item {i}"
        return
    for lineno, line in enumerate(text.splitlines(), 1):  # JSON Lines
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            # yielded, not raised, so `on_bad_sample: skip` can skip one bad line and keep reading
            rec = DataError(f"{url}:{lineno}", f"malformed JSON line: {exc.msg} at column {exc.colno}")
        yield rec, f"{url}:{lineno}"


def _iter_parquet_file(url: str) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield rec, f"{url} row {row}"
                row += 1


def iter_records(spec: SourceSpec) -> Iterator[tuple[Any, str]]:
    """Yield ``(record, where)`` in a deterministic order; an unparsable line is yielded as a DataError."""
    if spec.is_local_format:
        files = spec.expand_files()
        if not files:
            raise DataError(spec.source, "no data_files given")
        for url in files:
            if spec.source == "parquet" or url.endswith(".parquet"):
                yield from _iter_parquet_file(url)
            else:
                yield from _iter_json_file(url, spec.field)
        return
    import datasets

    kwargs = dict(spec.load_kwargs)
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    ds = datasets.load_dataset(spec.source, split=spec.split, **kwargs)
    name = f"{spec.source}[{spec.split}]"
    for i, rec in enumerate(ds):
        yield rec, f"{name} row {i}"


def load_records(spec: SourceSpec) -> list[tuple[Any, str]]:
    """All records in memory (streaming pack needs random access by index)."""
    return list(iter_records(spec))
