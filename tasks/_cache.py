"""Cache policies for steps whose result is a directory on disk (downloaded weights, packed shards).

Prefect's ``INPUTS + TASK_SOURCE`` key says "same arguments, same code" but neither "same data" nor "the
output is still there". Three additions fix that:

- :class:`FileContents` folds the *contents* of file arguments into the key, so editing a file is a cache
  miss even though its path did not change;
- :class:`InputFingerprint` folds in whatever a task-specific function derives from the arguments -- for
  packing, a stamp (size, mtime or etag) of every data file, the tokenizer's digest and the resolved dataset
  section -- so data changed in place is a miss;
- :class:`ValidatedCache` reads the record stored under the key and asks a validator whether its output
  still exists and matches what was recorded (sizes, manifest digest). If not, the key moves one step along
  a deterministic chain (``K -> H(K, "stale")``), which is a miss: the task runs again and stores its fresh
  result under the new key, where the next run finds it. Nothing is deleted from result storage.

Validators take the stored result by structure (:func:`as_model`), not by class identity: a record written by
another process may hold a class that unpickles as a different object (classes defined in ``__main__`` are
pickled by value), and an identity check would then reject a valid record and grow the chain on every call.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel, ValidationError

_MAX_CHAIN = 64
M = TypeVar("M", bound=BaseModel)


def as_model(record: Any, model: type[M]) -> M | None:
    """``record`` as an instance of ``model`` if it has the model's fields (any class, or a dict), else None."""
    if isinstance(record, model):
        return record
    data = record.model_dump() if isinstance(record, BaseModel) else record
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def _fs(path: str | Path):
    """(filesystem, path) for a local path or any fsspec URL: packed shards may live on object storage."""
    import fsspec

    return fsspec.core.url_to_fs(str(path))


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed); local path or fsspec URL."""
    fs, p = _fs(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dir_listing(root: str | Path) -> dict[str, int]:
    """Relative path -> size for every file under ``root``: what a validator compares later."""
    fs, p = _fs(root)
    base = p.rstrip("/")
    return {k[len(base):].lstrip("/"): int(v.get("size") or 0)
            for k, v in sorted(fs.find(base, detail=True).items()) if v.get("type", "file") == "file"}


def listing_matches(root: str | Path, files: dict[str, int]) -> bool:
    """True if every recorded file is still under ``root`` with its recorded size."""
    if not files:
        return False
    try:
        current = dir_listing(root)
    except (OSError, ValueError):
        return False
    return all(current.get(rel) == size for rel, size in files.items())


@dataclass
class FileContents(CachePolicy):
    """Key on the bytes of the files named by the given arguments (a missing file hashes as ``<missing>``)."""

    arg_names: list[str] = field(default_factory=list)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        parts = {}
        for name in self.arg_names:
            value = inputs.get(name)
            if isinstance(value, (str, Path)) and Path(value).is_file():
                parts[name] = file_digest(value)
            else:
                parts[name] = "<missing>"
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class InputFingerprint(CachePolicy):
    """Key on ``fingerprint(**inputs)``: a digest of what the arguments point at (data files, tokenizer)."""

    fingerprint: Callable[..., str] = field(default=lambda **inputs: "")

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        return hashlib.sha256(self.fingerprint(**inputs).encode()).hexdigest()


@dataclass
class ValidatedCache(CachePolicy):
    """Wrap ``base`` so a cached result is only reused if ``validator(result)`` says its outputs are intact."""

    base: CachePolicy = field(default_factory=lambda: INPUTS + TASK_SOURCE)
    validator: Callable[[Any], bool] = field(default=lambda result: True)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        key = self.base.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        if key is None:
            return None
        store = task_ctx.result_store
        for _ in range(_MAX_CHAIN):
            if not store.exists(key):
                return key  # miss: the task runs and stores under this key
            try:
                result = store.read(key).result
                valid = bool(self.validator(result))
            except Exception:  # noqa: BLE001 - unreadable record (other serializer, corrupted): treat as stale
                valid = False
            if valid:
                return key  # hit
            key = hashlib.sha256(f"{key}:stale".encode()).hexdigest()
        return key


def output_cache(validator: Callable[[Any], bool], file_args: list[str] | None = None,
                 fingerprint: Callable[..., str] | None = None) -> CachePolicy:
    """``INPUTS + TASK_SOURCE`` (+ contents of ``file_args``, + ``fingerprint(**inputs)``), reused only while
    ``validator`` accepts the stored result."""
    base = INPUTS + TASK_SOURCE
    if file_args:
        base = base + FileContents(arg_names=file_args)
    if fingerprint:
        base = base + InputFingerprint(fingerprint=fingerprint)
    return ValidatedCache(base=base, validator=validator)
