"""Caches of the steps that produce directories: a re-run is a cache hit, a cache entry whose files vanished is
refreshed, a record is judged by its structure (not its class), and the pack key follows the data's revision."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow

from tasks.download_weights import DownloadResult, download_weights


@flow(name="test-download-twice")
def _download_flow(source: str, out: str) -> list:
    return [download_weights(source, out, return_state=True) for _ in range(2)]


def test_download_cache_hit_then_refresh_when_files_vanish(prefect_api: str, tmp_path: Path, make_checkpoint) -> None:
    src = make_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    first, second = _download_flow(src.as_uri(), str(out))
    assert first.is_completed() and first.name == "Completed"
    assert second.name == "Cached"
    # A new flow run with the same inputs hits the cache too (key = inputs + task source, no run id).
    (again, _) = _download_flow(src.as_uri(), str(out))
    assert again.name == "Cached"
    # Delete a shard: the cached record no longer matches the disk, so the task runs and re-fetches it.
    (out / "model-00001-of-00002.safetensors").unlink()
    (refreshed, cached_after) = _download_flow(src.as_uri(), str(out))
    assert refreshed.name == "Completed"
    result: DownloadResult = refreshed.result()
    assert (out / "model-00001-of-00002.safetensors").stat().st_size == result.files["model-00001-of-00002.safetensors"]
    assert cached_after.name == "Cached"


def test_cached_record_accepted_by_structure(tmp_path: Path, make_checkpoint) -> None:
    """A record whose class was pickled by value (what a task run as ``__main__`` stores) is still a valid hit."""
    import cloudpickle
    from pydantic import create_model

    from mirotrain.hub import download
    from tasks.download_weights import _still_on_disk

    report = download(str(make_checkpoint(tmp_path / "src")), tmp_path / "out", progress=lambda line: None)
    fields = {name: (info.annotation, info.default if not info.is_required() else ...)
              for name, info in DownloadResult.model_fields.items()}
    main_class = create_model("DownloadResult", __module__="__main__", **fields)
    record = cloudpickle.loads(cloudpickle.dumps(main_class(path=report.output_dir, source="src", files=report.files,
                                                            total_bytes=report.total_bytes)))
    assert type(record) is not DownloadResult and not isinstance(record, DownloadResult)
    assert _still_on_disk(record)
    assert not _still_on_disk({"path": report.output_dir})  # not the shape of a download result


@pytest.mark.slow  # up to 3 x the 10 s Hub timeout offline, plus the tokenizer
def test_pack_fingerprint_follows_hub_dataset_revision(sft_pack_config: Path) -> None:
    """A Hub dataset keys the pack cache on its revision (the commit the Hub resolves it to, or -- when the Hub
    cannot be asked, as here offline -- the requested revision), so a new revision is packed again."""
    from tasks.pack_dataset import pack_fingerprint

    hub = ["dataset.source=example-org/agent-traces", "~dataset.data_files"]
    v1 = pack_fingerprint(str(sft_pack_config), [*hub, "dataset.revision=v1"])
    assert pack_fingerprint(str(sft_pack_config), [*hub, "dataset.revision=v1"]) == v1
    assert pack_fingerprint(str(sft_pack_config), [*hub, "dataset.revision=v2"]) != v1


def test_download_refetches_a_source_changed_in_place(prefect_api: str, tmp_path: Path, make_checkpoint) -> None:
    """The download key includes what the source holds (file sizes and mtimes here): a source file rewritten in
    place is fetched again, an unchanged source stays a cache hit."""
    src = make_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    first, cached = _download_flow(src.as_uri(), str(out))
    assert (first.name, cached.name) == ("Completed", "Cached")
    (src / "config.json").write_text('{"model_type": "qwen3", "note": "rewritten in place"}')
    changed, cached_again = _download_flow(src.as_uri(), str(out))
    assert (changed.name, cached_again.name) == ("Completed", "Cached")
    assert (out / "config.json").read_text() == (src / "config.json").read_text()
