"""Fetch model weights from the Hugging Face Hub, any fsspec URL or a local path, then verify them.

One entry point, :func:`download`, serves `mirotrain download` and the pipeline's ``download_weights`` task,
so a tiny checkpoint on ``file://`` or ``memory://`` goes through exactly the code a 32B Hub repo does.

Design points:

- **Resumable.** A file whose destination already has the expected size is skipped; an interrupted copy
  is continued from its ``.partial`` file (fsspec sources) or by ``huggingface_hub`` itself (Hub sources,
  which keeps its own per-file metadata under ``DIR/.cache/huggingface``).
- **Verified.** Sizes against the source listing, every ``*.safetensors`` header parsed and its tensor
  byte ranges checked against the file size, every ``*.safetensors.index.json`` checked for coverage
  (each tensor it names exists in the shard it points to, each shard it names exists).
- **Secret-safe.** The Hub token comes from the argument or ``HF_TOKEN`` and is never printed; error text
  is scrubbed of it before it is raised.
- **Recorded.** A successful run writes ``DIR/.mirotrain_download.json`` (source, revision, file sizes), which
  the pipeline's cache check re-reads to decide whether a cached download is still on disk.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

RECORD_NAME = ".mirotrain_download.json"
# Files a checkpoint never needs and that fsspec listings of git-backed sources may show.
_SKIP_PARTS = {".git", ".cache", "__pycache__"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 8 << 20

ProgressFn = Callable[[str], None]


class DownloadError(RuntimeError):
    """Raised when a source cannot be read or the downloaded files fail verification."""


class SourceNotFound(DownloadError):
    """The source does not exist (no such path, URL, Hub repo, revision or file): retrying cannot help.

    Kept apart from other :class:`DownloadError` s (network, truncated copy), which a retry may fix.
    """


@dataclass
class DownloadReport:
    """What :func:`download` did; also the content of ``DIR/.mirotrain_download.json``."""

    source: str
    kind: str  # "hub" | "fsspec" | "local"
    output_dir: str
    revision: str | None = None  # for the Hub, the commit sha that was downloaded
    requested_revision: str | None = None  # what the caller asked for (None: main)
    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    total_bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def classify_source(source: str) -> str:
    """Tell a Hub repo id from an fsspec URL from a local path.

    A URL scheme (``s3://``, ``file://``, ``memory://``) means fsspec, except ``hf://`` which is the Hub. A
    path that exists locally wins over a repo id, so ``./Qwen/Qwen3-8B`` is read from disk; otherwise a
    string shaped like ``org/name`` is a Hub repo.
    """
    if source.startswith("hf://"):
        return "hub"
    if "://" in source:
        return "fsspec"
    if Path(source).expanduser().exists():
        return "local"
    if _REPO_ID.match(source):
        return "hub"
    raise SourceNotFound(f"source {source!r} is not an existing path, a URL or an 'org/name' Hub repo id")


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _wanted(rel: str, include: Iterable[str] | None) -> bool:
    if any(part in _SKIP_PARTS for part in Path(rel).parts):
        return False
    patterns = list(include or [])
    return not patterns or any(fnmatch.fnmatch(rel, p) for p in patterns)


# ----------------------------------------------------------------------------------------------------------
# Verification


def read_safetensors_header(path: str | Path) -> dict:
    """Parse a safetensors header and check every tensor's byte range lies inside the file.

    A truncated download usually still has an intact header, so the byte ranges (not just the JSON) are
    what catch it.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DownloadError(f"{path}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise DownloadError(f"{path}: header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DownloadError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info.get("data_offsets", (None, None))
        if start is None or not (0 <= start <= stop <= data_len):
            raise DownloadError(f"{path}: tensor {name!r} data_offsets {info.get('data_offsets')} outside the {data_len}-byte data area")
        end = max(end, stop)
    if end != data_len:
        raise DownloadError(f"{path}: tensors end at byte {end} of a {data_len}-byte data area (truncated or padded file)")
    return header


def verify_dir(root: str | Path, expected_sizes: dict[str, int] | None = None) -> list[str]:
    """Return a list of problems with a downloaded checkpoint directory (empty = good).

    Checks sizes against ``expected_sizes``, every safetensors header, and every index's coverage.
    """
    root = Path(root)
    problems: list[str] = []
    for rel, size in (expected_sizes or {}).items():
        p = root / rel
        if not p.is_file():
            problems.append(f"missing file {rel}")
        elif size >= 0 and p.stat().st_size != size:
            problems.append(f"{rel}: size {p.stat().st_size} != expected {size}")
    headers: dict[str, dict] = {}
    for p in sorted(root.rglob("*.safetensors")):
        if any(part in _SKIP_PARTS for part in p.relative_to(root).parts):
            continue
        try:
            headers[str(p.relative_to(root))] = read_safetensors_header(p)
        except DownloadError as exc:
            problems.append(str(exc))
    for idx in sorted(root.rglob("*.safetensors.index.json")):
        if any(part in _SKIP_PARTS for part in idx.relative_to(root).parts):
            continue
        try:
            weight_map: dict[str, str] = json.loads(idx.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as exc:
            problems.append(f"{idx.name}: not a safetensors index ({exc})")
            continue
        base = idx.parent.relative_to(root)
        for tensor, shard in weight_map.items():
            rel = str(base / shard) if str(base) != "." else shard
            if rel not in headers:
                problems.append(f"{idx.name}: tensor {tensor!r} points at missing or unreadable shard {shard}")
            elif tensor not in headers[rel]:
                problems.append(f"{idx.name}: tensor {tensor!r} is not in shard {shard}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Copying


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _copy_fsspec(fs, src_root: str, files: dict[str, int], out: Path, report: DownloadReport, progress: ProgressFn) -> None:
    """Copy files from an fsspec filesystem, skipping complete ones and continuing ``.partial`` ones."""
    total = sum(files.values())
    done = 0
    for i, (rel, size) in enumerate(sorted(files.items()), 1):
        dest = out / rel
        if dest.is_file() and dest.stat().st_size == size:
            report.skipped.append(rel)
            done += size
            progress(f"[download] {i}/{len(files)} {rel}: already complete ({_human(size)})")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".partial")
        have = part.stat().st_size if part.is_file() else 0
        if have > size:  # the source changed under us; start over
            part.unlink()
            have = 0
        src = f"{src_root.rstrip('/')}/{rel}"
        with fs.open(src, "rb") as fin, open(part, "ab") as fout:
            if have:
                fin.seek(have)
                progress(f"[download] {rel}: resuming at {_human(have)}")
            last = time.monotonic()
            copied = have
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
                copied += len(chunk)
                if time.monotonic() - last > 5:
                    progress(f"[download] {rel}: {_human(copied)}/{_human(size)}")
                    last = time.monotonic()
        if part.stat().st_size != size:
            raise DownloadError(f"{rel}: copied {part.stat().st_size} bytes, source listing says {size}")
        os.replace(part, dest)
        report.downloaded.append(rel)
        done += size
        progress(f"[download] {i}/{len(files)} {rel}: {_human(size)} ({_human(done)}/{_human(total)})")


# fsspec ``info`` fields that change when a file's contents change: size, local mtime, object-store etags.
STAMP_FIELDS = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "md5", "generation")


def info_stamp(info: dict) -> dict[str, str]:
    """The fields of an fsspec ``info`` record that change when the file changes (see :data:`STAMP_FIELDS`)."""
    return {k: str(info[k]) for k in STAMP_FIELDS if info.get(k) is not None}


def _list_fsspec_info(source: str, kind: str) -> tuple[object, str, dict[str, dict]]:
    """(filesystem, root, relative path -> fsspec info) of every file of a local path or fsspec URL."""
    import fsspec

    if kind == "local":
        source = str(Path(source).expanduser().resolve())
    fs, root = fsspec.core.url_to_fs(source)
    try:  # not fs.exists(): it answers False for any error, which would make a network error look like "not found"
        info = fs.info(root)
    except FileNotFoundError:
        raise SourceNotFound(f"source {source!r} does not exist") from None
    if info.get("type") == "file":
        return fs, root.rsplit("/", 1)[0], {root.rsplit("/", 1)[-1]: info}
    root_s = root.rstrip("/")
    return fs, root_s, {path[len(root_s):].lstrip("/"): info for path, info in fs.find(root, detail=True).items()
                        if info.get("type", "file") == "file"}


def _list_fsspec(source: str, kind: str) -> tuple[object, str, dict[str, int]]:
    fs, root, infos = _list_fsspec_info(source, kind)
    return fs, root, {rel: int(info.get("size") or 0) for rel, info in infos.items()}


def hub_not_found(exc: BaseException) -> bool:
    """True if a ``huggingface_hub`` error says the repo, revision or file does not exist (HTTP 404).

    ``LocalEntryNotFoundError`` is excluded: the Hub raises it when it could not be reached and the file is not
    in the local cache, which is a network problem, not a missing file.
    """
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, LocalEntryNotFoundError):
        return False
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
        return True
    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return getattr(response, "status_code", None) == 404


def hub_revision(repo: str, revision: str | None = None, token: str | None = None, *,
                 repo_type: str = "model", timeout_s: float = 10.0, offline: str | None = None) -> str | None:
    """The commit sha a Hub repo's ``revision`` (default: main) points at now. When the Hub cannot be reached:
    ``offline`` (the sha a completed download recorded, see :func:`recorded_hub_sha`) if given, so weights on
    disk keep their cache key through a Hub outage; else ``revision`` itself, so a cache key still changes
    when the requested revision does.

    Raises :class:`SourceNotFound` when the Hub answers that the repo or revision does not exist.
    """
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(repo.removeprefix("hf://"), revision=revision, repo_type=repo_type, token=token,
                                 timeout=timeout_s).sha
    except Exception as exc:  # noqa: BLE001 - every failure but "not found" means "could not ask"
        if hub_not_found(exc):
            raise SourceNotFound(_redact(f"Hub {repo_type} {repo!r} (revision {revision or 'main'}) not found: {exc}",
                                         token)) from None
        return offline if offline is not None else revision


def recorded_hub_sha(output_dir: str | Path, source: str, revision: str | None) -> str | None:
    """The commit sha a completed download of Hub ``source`` at ``revision`` recorded in ``output_dir``
    (:func:`read_record`), or None when there is no such record. ``revision`` matches the record when it is
    what was asked for then, or the sha itself."""
    record = read_record(output_dir) or {}
    if record.get("kind") != "hub" or record.get("source") != source or not record.get("revision"):
        return None
    return record["revision"] if revision in (record.get("requested_revision"), record["revision"]) else None


def source_fingerprint(source: str, revision: str | None = None, token: str | None = None,
                       include: list[str] | None = None, output_dir: str | Path | None = None) -> str:
    """What ``source`` holds now, as one JSON string: a Hub repo's commit (see :func:`hub_revision`; while the
    Hub is unreachable, the commit a completed download into ``output_dir`` recorded), or the size and
    mtime/etag of every file under a local path or fsspec URL. Keys the download cache, so a source changed in
    place is fetched again. Raises :class:`SourceNotFound` for a source that does not exist."""
    kind = classify_source(source)
    if kind == "hub":
        offline = recorded_hub_sha(output_dir, source, revision) if output_dir is not None else None
        return json.dumps({"hub": source.removeprefix("hf://"),
                           "sha": hub_revision(source, revision, token, offline=offline)})
    _, _, infos = _list_fsspec_info(source, kind)
    return json.dumps({rel: info_stamp(info) for rel, info in sorted(infos.items()) if _wanted(rel, include)})


def _download_hub(repo: str, out: Path, token: str | None, revision: str | None, include: list[str] | None,
                  report: DownloadReport, progress: ProgressFn) -> None:
    """Hub download through ``snapshot_download`` (resumable by design), sizes from the repo listing."""
    from huggingface_hub import HfApi, snapshot_download

    repo = repo.removeprefix("hf://")
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True, token=token)
        expected = {s.rfilename: int(s.size) if s.size is not None else -1 for s in (info.siblings or [])}
        expected = {k: v for k, v in expected.items() if _wanted(k, include)}
        report.revision = info.sha or revision
        for rel, size in expected.items():
            p = out / rel
            if p.is_file() and p.stat().st_size == size:
                report.skipped.append(rel)
        progress(f"[download] {repo}@{report.revision}: {len(expected)} files, {_human(sum(max(v, 0) for v in expected.values()))}, "
                 f"{len(report.skipped)} already complete")
        snapshot_download(repo, revision=report.revision, local_dir=str(out), token=token,
                          allow_patterns=include or None)
    except DownloadError:
        raise
    except Exception as exc:  # network / auth / missing repo: keep the type in the text, never the token
        error = SourceNotFound if hub_not_found(exc) else DownloadError
        raise error(_redact(f"hub download of {repo!r} failed: {type(exc).__name__}: {exc}", token)) from None
    report.files = expected
    report.downloaded = [k for k in expected if k not in report.skipped]


def download(source: str, output_dir: str | Path, *, token: str | None = None, revision: str | None = None,
             include: list[str] | None = None, verify: bool = True,
             progress: ProgressFn | None = None) -> DownloadReport:
    """Download ``source`` into ``output_dir``, resuming earlier partial runs, and verify the result.

    Args:
        source: Hub repo id (``Qwen/Qwen3-8B`` or ``hf://Qwen/Qwen3-8B``), fsspec URL or local path.
        output_dir: Destination directory; created if missing.
        token: Hub token; defaults to ``HF_TOKEN``. Only used for Hub sources and never printed.
        revision: Hub branch, tag or commit (ignored for other sources).
        include: Optional glob patterns (relative paths) restricting which files are fetched.
        verify: Check sizes, safetensors headers and index coverage; raise :class:`DownloadError` on a problem.
        progress: Receives one human-readable line per event; defaults to printing to stdout.
    """
    progress = progress or (lambda line: print(line, flush=True))
    token = token or os.environ.get("HF_TOKEN") or None
    kind = classify_source(source)
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(source=source, kind=kind, output_dir=str(out), revision=revision if kind == "hub" else None,
                            requested_revision=revision if kind == "hub" else None)
    t0 = time.monotonic()
    if kind == "hub":
        _download_hub(source, out, token, revision, include, report, progress)
    else:
        fs, root, files = _list_fsspec(source, kind)
        files = {k: v for k, v in files.items() if _wanted(k, include)}
        if not files:
            raise DownloadError(f"source {source!r} has no files to download")
        progress(f"[download] {source}: {len(files)} files, {_human(sum(files.values()))}")
        report.files = files
        _copy_fsspec(fs, root, files, out, report, progress)
    report.total_bytes = sum(max(v, 0) for v in report.files.values())
    if verify:
        problems = verify_dir(out, report.files)
        if problems:
            raise DownloadError("verification failed:\n  " + "\n  ".join(problems))
        progress(f"[download] verified {len(report.files)} files (sizes, safetensors headers, index coverage)")
    report.seconds = round(time.monotonic() - t0, 3)
    (out / RECORD_NAME).write_text(report.to_json())
    progress(f"[download] done: {len(report.downloaded)} fetched, {len(report.skipped)} already complete, "
             f"{_human(report.total_bytes)} in {report.seconds:.1f}s -> {out}")
    return report


def read_record(output_dir: str | Path) -> dict | None:
    """The record a completed :func:`download` left in ``output_dir``, or None if there is none."""
    p = Path(output_dir) / RECORD_NAME
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None

