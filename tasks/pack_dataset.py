"""Task ``pack_dataset``: tokenize and pack a config's dataset section into Arrow shards (`mirotrain pack`).

Calls the engine's Python API (:func:`mirotrain.data.pack_shards.pack_dataset`, the function behind `mirotrain pack`) in
the task process: packing is single-process CPU work and the shard directory it returns is keyed by the
engine on config + tokenizer hashes. The Prefect cache key (:func:`pack_fingerprint`) adds what the
arguments point at: a stamp (size, mtime or etag) of every data file, a Hub dataset's current revision, the
tokenizer's digest and the resolved dataset and tokenizer sections -- so a data file changed in place is
packed again. A cached result is reused only while ``manifest.json`` has the recorded digest and every shard
file its recorded size, so a deleted or rewritten shard directory is packed again too. The engine reuses a
shard directory whose ``manifest.json`` exists, so before calling it the task checks that every shard the
manifest names is still there and readable (:func:`damage`), and otherwise makes the engine pack it anew
(``force=True``): a cache miss caused by a deleted or truncated shard then rebuilds it. Missing data files
and config errors fail at once; other errors are retried (``tasks/_retry.py``).

    python -m tasks.pack_dataset --config mirotrain/configs/tiny/sft.yaml --overrides dataset.source=data.jsonl
"""

from __future__ import annotations

import json
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel

from tasks._cache import as_model, dir_listing, file_digest, listing_matches, output_cache
from tasks._retry import retry_unless_permanent
from tasks._runtime import run_logger


class PackResult(BaseModel):
    """Shard directory, the manifest digest and file sizes the cache check re-verifies, and a few counts."""

    path: str
    section: str
    manifest_sha256: str
    files: dict[str, int]
    manifest: dict[str, Any]


def _still_on_disk(record: Any) -> bool:
    result = as_model(record, PackResult)
    if result is None:
        return False
    try:
        digest = file_digest(f"{result.path.rstrip('/')}/manifest.json")
    except (OSError, ValueError):
        return False
    return digest == result.manifest_sha256 and listing_matches(result.path, result.files)


def damage(shard_dir: str) -> str | None:
    """Why a shard directory whose manifest exists cannot be used as it is (a shard file the manifest names
    is missing, or is not a complete Arrow file: its footer is read), or None when it is intact."""
    import fsspec
    import pyarrow as pa

    from mirotrain.data.shards import join, read_manifest

    for shard in read_manifest(shard_dir).get("shards", []):
        url = join(shard_dir, shard["file"])
        try:
            with fsspec.open(url, "rb") as f:
                pa.ipc.open_file(f)
        except FileNotFoundError:
            return f"shard {shard['file']} is missing"
        except (OSError, pa.ArrowInvalid) as exc:
            return f"shard {shard['file']} is unreadable ({exc})"
    return None


def pack_fingerprint(config: str, overrides: list[str] | None = None, section: str = "dataset") -> str:
    """Everything outside the arguments that decides the packed output, as one JSON string (the cache key's
    data part): the resolved ``section`` and ``tokenizer`` config, the engine's shard directory for them (its
    name hashes the tokenizer files and every packing option), a stamp of each data file, and for a Hub
    dataset the commit its revision points at."""
    from mirotrain.config.tree import read_config
    from mirotrain.data.pack_shards import build_dataset, output_root, shard_dir_for
    from mirotrain.hub import hub_revision
    from tasks._data_inputs import data_stamps, is_hub_dataset

    cfg = read_config(config, list(overrides or []), scope=("tokenizer", section))
    ds = build_dataset(cfg, section)
    spec = ds.source
    revision = (hub_revision(spec.source, spec.load_kwargs.get("revision"), repo_type="dataset")
                if is_hub_dataset(spec) else None)
    return json.dumps({"section": cfg.to_dict().get(section), "tokenizer": cfg.tokenizer.component,
                       "shard_dir": shard_dir_for(ds, output_root(cfg, section)), "files": data_stamps(spec),
                       "hub_revision": revision}, sort_keys=True, default=str)


@task(name="pack_dataset", retries=2, retry_delay_seconds=[5, 30], persist_result=True,
      retry_condition_fn=retry_unless_permanent,
      cache_policy=output_cache(_still_on_disk, file_args=["config"], fingerprint=pack_fingerprint))
def pack_dataset(config: str, overrides: list[str] | None = None,
                 section: Literal["dataset", "dataset_val"] = "dataset") -> PackResult:
    """Pack one dataset section of a training config into Arrow shards; returns the shard directory.

    Args:
        config: Training config YAML (its dataset.output_dir decides where shards go).
        overrides: key=value config overrides, as on the `mirotrain` command line.
        section: Which dataset section to pack (dataset or dataset_val).
    """
    from mirotrain.config.tree import read_config
    from mirotrain.data.pack_shards import build_dataset, output_root, shard_dir_for, summary_line
    from mirotrain.data.pack_shards import pack_dataset as engine_pack_dataset
    from mirotrain.data.shards import manifest_exists, read_manifest

    logger = run_logger()
    cfg = read_config(config, list(overrides or []), scope=("tokenizer", section))
    logger.info(f"packing section {section!r} of {config} (overrides: {list(overrides or [])})")
    ds = build_dataset(cfg, section)
    existing = shard_dir_for(ds, output_root(cfg, section))
    why = damage(existing) if manifest_exists(existing) else None
    if why:
        logger.warning(f"shard directory {existing} is damaged ({why}); packing it again")
    path = str(engine_pack_dataset(cfg, section, tokenizer=ds.tokenizer, force=why is not None))
    manifest = read_manifest(path)
    manifest = manifest if isinstance(manifest, dict) else dict(getattr(manifest, "__dict__", {}))
    small = {k: v for k, v in manifest.items() if not isinstance(v, (list, dict)) or len(str(v)) < 2000}
    logger.info(f"packed {section} -> {path}: {summary_line(manifest)}")
    return PackResult(path=path, section=section, manifest_sha256=file_digest(f"{path.rstrip('/')}/manifest.json"),
                      files=dir_listing(path), manifest=small)


def dataset_sections(config: str, overrides: list[str] | None = None) -> list[str]:
    """The dataset sections a config defines (``dataset`` always; ``dataset_val`` when present)."""
    from mirotrain.config import load_config

    cfg = load_config(config, list(overrides or []))
    return [s for s in ("dataset", "dataset_val") if cfg.get(s)]


def main(argv: list[str] | None = None) -> int:
    from tasks._cli import run_task_cli

    return run_task_cli(pack_dataset, argv, module="pack_dataset")


if __name__ == "__main__":
    raise SystemExit(main())

