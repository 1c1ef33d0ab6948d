"""Task ``download_weights``: fetch and verify a checkpoint (Hub repo, fsspec URL or local path).

Wraps :func:`mirotrain.hub.download` (the engine side of `mirotrain download`). Cached on its inputs, its
source code and what the source holds now (:func:`mirotrain.hub.source_fingerprint`: the commit a Hub
revision points at -- while the Hub is unreachable, the commit the download in ``output_dir`` recorded, so
weights already on disk stay a cache hit through a Hub outage -- or each source file's size and mtime/etag),
and reused only while every recorded file is
still on disk with its recorded size; otherwise it runs again, and the engine skips whatever is already
complete. A source that does not exist
(:class:`mirotrain.hub.SourceNotFound`) fails after one attempt; network errors and failed verifications are
retried (``tasks/_retry.py``).

The Hub token is read from a Prefect Secret block (``hf_token_secret``) or ``HF_TOKEN``; it is never a
parameter value, so it never lands in the run's stored parameters, logs or cache key.

    python -m tasks.download_weights --source Qwen/Qwen3-8B --output-dir /data/qwen3-8b
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel

from mirotrain.hub import DownloadError, SourceNotFound, download, read_record, source_fingerprint
from tasks._cache import as_model, listing_matches, output_cache
from tasks._retry import retry_unless_permanent
from tasks._runtime import run_logger


class DownloadResult(BaseModel):
    """Where the weights are, and the file sizes the cache check re-verifies."""

    path: str
    source: str
    revision: str | None = None
    files: dict[str, int]
    total_bytes: int


def _still_on_disk(record: Any) -> bool:
    result = as_model(record, DownloadResult)
    return result is not None and read_record(result.path) is not None and listing_matches(
        result.path, {k: v for k, v in result.files.items() if v >= 0})


def _resolve_token(secret_block: str | None) -> str | None:
    if secret_block:
        from prefect.blocks.system import Secret

        return Secret.load(secret_block).get()
    return os.environ.get("HF_TOKEN") or None


def _source_now(source: str, output_dir: str, revision: str | None = None, include: list[str] | None = None,
                hf_token_secret: str | None = None) -> str:
    """The cache key's source part; a source that does not exist keys as such (the task then fails on it)."""
    try:
        return source_fingerprint(source, revision, _resolve_token(hf_token_secret), include, output_dir)
    except SourceNotFound as exc:
        return f"not found: {exc}"


@task(name="download_weights", retries=3, retry_delay_seconds=[10, 30, 90], persist_result=True,
      retry_condition_fn=retry_unless_permanent, cache_policy=output_cache(_still_on_disk, fingerprint=_source_now))
def download_weights(source: str, output_dir: str, revision: str | None = None,
                     include: list[str] | None = None, hf_token_secret: str | None = None) -> DownloadResult:
    """Download model weights into ``output_dir``, resuming and verifying (sizes, safetensors headers, index).

    Args:
        source: Hub repo id (Qwen/Qwen3-8B), fsspec URL (s3://..., file://...) or local path.
        output_dir: Destination directory; a re-run resumes into it.
        revision: Hub branch, tag or commit.
        include: Glob patterns restricting which files are fetched.
        hf_token_secret: Name of a Prefect Secret block holding the Hub token (default: $HF_TOKEN).
    """
    logger = run_logger()
    token = _resolve_token(hf_token_secret)
    try:
        report = download(source, output_dir, token=token, revision=revision, include=include or None,
                          progress=logger.info)
    except SourceNotFound:
        raise  # permanent: not retried
    except DownloadError as exc:
        raise RuntimeError(str(exc)) from None  # a plain failure: Prefect retries it
    return DownloadResult(path=str(Path(report.output_dir)), source=source, revision=report.revision,
                          files=report.files, total_bytes=report.total_bytes)


def main(argv: list[str] | None = None) -> int:
    from tasks._cli import run_task_cli

    return run_task_cli(download_weights, argv, module="download_weights")


if __name__ == "__main__":
    raise SystemExit(main())
