"""The offline packer behind ``mirotrain pack``: tokenise with a pool of processes, pack, write Arrow shards +
``manifest.json``. (The streaming packer is :mod:`mirotrain.data.streaming`; both plan rows with
:mod:`mirotrain.data.packing`.)

Packing runs once, before training, on one machine, not on every rank of the training job. The output directory is ``{output_dir}/{kind}-{layout}-{hash}`` where the hash covers the
input files (URL, size, mtime/etag), the tokenizer files and options, and every dataset option that changes
the rows; a finished directory has a ``manifest.json``, so re-running with the same inputs is a no-op.

Determinism: samples are tokenised in source order (``imap`` keeps order), rows are planned by
:func:`mirotrain.data.packing.plan_packs` with ``pack_seed``; the same inputs give byte-identical shards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from mirotrain.config.registry import instantiate
from mirotrain.data.datasets import IGNORE_INDEX, ConcatDataset, PreferenceDataset, _BaseDataset
from mirotrain.data.errors import DataError, SkipLog
from mirotrain.data.packing import SFT_COLUMNS, plan_packs, sft_row
from mirotrain.data.preference import DPO_COLUMNS, build_dpo_row, pair_row_stats
from mirotrain.data.shards import SCHEMA_VERSION, join, local_cpu_count, manifest_exists, read_manifest, write_rows

if TYPE_CHECKING:
    from mirotrain.config.tree import TrainConfig

PACKING_VERSION = "bfd-1"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mirotrain", "packed")

_WORKER_DS: _BaseDataset | None = None


def _worker_init(ds: _BaseDataset | None) -> None:
    global _WORKER_DS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if ds is not None:
        _WORKER_DS = ds


def _encode_chunk(chunk: list[tuple[int, Any, str]]) -> list[tuple[int, str, Any]]:
    ds = _WORKER_DS
    assert ds is not None
    return [(idx, *ds.encode_or_report(rec, where)) for idx, rec, where in chunk]


def _chunks(ds: _BaseDataset, size: int) -> Iterator[list[tuple[int, Any, str]]]:
    buf = []
    for idx, (rec, where) in enumerate(ds.iter_records()):
        buf.append((idx, rec, where))
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def encode_all(ds: _BaseDataset, num_workers: int | None = None, progress: bool = False, chunk_size: int = 64):
    """Tokenise every sample. Returns ``(indices, encoded, log)`` in source order.

    ``num_workers`` processes (``None``: all cores up to 16; ``0``/``1``: in this process). Workers inherit the
    dataset by ``fork`` where available (no pickling of the tokenizer); elsewhere it is pickled once per worker.
    """
    global _WORKER_DS
    if num_workers is None:
        num_workers = min(16, local_cpu_count())
    log = SkipLog()
    indices: list[int] = []
    encoded: list[Any] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" samples", desc="tokenize", file=sys.stderr, mininterval=1.0)

    def consume(results: list[tuple[int, str, Any]]) -> None:
        for idx, status, value in results:
            if status == "ok":
                indices.append(idx)
                encoded.append(value)
                if getattr(value, "truncated", False) or getattr(getattr(value, "chosen", None), "truncated", False) \
                        or getattr(getattr(value, "rejected", None), "truncated", False):
                    log.truncated += 1
            elif status == "drop":
                log.dropped += 1
            elif status == "skip":
                log.skip_message(value)
            elif status == "filter":
                log.filtered += 1
        if bar is not None:
            bar.update(len(results))

    if num_workers <= 1:
        _WORKER_DS = ds
        try:
            for chunk in _chunks(ds, chunk_size):
                consume(_encode_chunk(chunk))
        finally:
            _WORKER_DS = None
    else:
        methods = mp.get_all_start_methods()
        if "fork" in methods:
            ctx = mp.get_context("fork")
            _WORKER_DS = ds
            init_arg = None
        else:  # pragma: no cover - non-Linux
            ctx = mp.get_context("spawn")
            init_arg = ds
        try:
            with ctx.Pool(num_workers, initializer=_worker_init, initargs=(init_arg,)) as pool:
                for results in pool.imap(_encode_chunk, _chunks(ds, chunk_size), chunksize=1):
                    consume(results)
        finally:
            _WORKER_DS = None
    if bar is not None:
        bar.close()
    return indices, encoded, log


def shard_dir_for(ds: _BaseDataset, output_root: str) -> str:
    """``{output_root}/{kind}-{layout}-{hash16}``: the hash keys inputs, tokenizer and options."""
    layout = "packed" if ds.options.packed else "docs"
    return join(output_root, f"{ds.kind}-{layout}-{ds.fingerprint()[:16]}")


def pack(ds: _BaseDataset, output_root: str, *, num_workers: int | None = None, progress: bool = False,
         force: bool = False) -> tuple[str, dict]:
    """Tokenise + pack ``ds`` under ``output_root``; returns ``(shard_dir, manifest)`` (cached when complete)."""
    out_dir = shard_dir_for(ds, output_root)
    if not force and manifest_exists(out_dir):
        manifest = read_manifest(out_dir)
        manifest["cache_hit"] = True
        return out_dir, manifest
    L = ds.options.packed_seq_len
    t0 = time.time()
    indices, encoded, log = encode_all(ds, num_workers=num_workers, progress=progress)
    t_tok = time.time() - t0
    if not encoded:
        raise DataError(ds.origin(), "no usable samples "
                        f"(skipped {log.skipped}, dropped {log.dropped}, filtered {log.filtered})")
    lengths = np.asarray([len(e) for e in encoded], dtype=np.int64)
    pairs = ds.kind == PreferenceDataset.kind
    if pairs:
        columns = dict(DPO_COLUMNS)
        if ds.one_pair_per_row:  # MiroTrain's one pair per micro-batch, in source order (the sampler shuffles rows)
            plan = [[k] for k in range(len(encoded))]
        else:
            plan = plan_packs(lengths, int(L), seed=ds.options.pack_seed)
        rows = (build_dpo_row([(indices[k], encoded[k]) for k in p]) for p in plan)
        trained = sum(int((e.chosen.labels != IGNORE_INDEX).sum() + (e.rejected.labels != IGNORE_INDEX).sum()) for e in encoded)
    else:
        columns = dict(SFT_COLUMNS)
        if ds.options.packed:
            plan = plan_packs(lengths, int(L), seed=ds.options.pack_seed)
        else:
            plan = [[k] for k in range(len(encoded))]
        rows = (sft_row([(indices[k], encoded[k]) for k in p]) for p in plan)
        trained = sum(int((e.labels != IGNORE_INDEX).sum()) for e in encoded)
    tokens = int(lengths.sum())
    row_len = int(L) if (ds.options.packed or pairs) else int(lengths.max())
    rows_per_shard = ds.options.rows_per_shard or max(1, (1 << 24) // row_len)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": ds.kind,
        "layout": "packed" if (ds.options.packed or pairs) else "docs",
        "packing": PACKING_VERSION,
        "packed_seq_len": int(L) if L is not None else None,
        "max_doc_len": int(lengths.max()),
        "pad_id": int(ds.tokenizer.pad_id),
        "eos_id": int(ds.tokenizer.eos_id),
        "vocab_size": int(ds.tokenizer.vocab_size),
        "tokenizer_path": str(ds.tokenizer.path),
        "tokenizer_hash": ds.tokenizer.fingerprint(),
        "dataset_hash": ds.fingerprint(),
        "config": ds.describe(),
        "samples": len(encoded) + log.skipped + log.dropped + log.filtered,
        "docs": len(encoded),
        **log.as_dict(),
        "tokens": tokens,
        "trained_tokens": trained,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if manifest["layout"] == "packed":
        manifest["pad_fraction"] = 1.0 - tokens / (len(plan) * int(L))
    if pairs:
        manifest.update(pair_row_stats(plan), one_pair_per_row=ds.one_pair_per_row)
    written = write_rows(out_dir, rows, columns, manifest, rows_per_shard)
    written["seconds"] = round(time.time() - t0, 3)
    written["tokenize_seconds"] = round(t_tok, 3)
    written["cache_hit"] = False
    return out_dir, written


def output_root(cfg: TrainConfig, section: str = "dataset") -> str:
    """Where packed data goes: ``{section}.output_dir``, else ``{output_dir}/packed``, else the user cache."""
    ds = cfg.data.section(section)
    if ds is not None and ds.output_dir:
        return str(ds.output_dir)
    if cfg.run.output_dir:
        return join(str(cfg.run.output_dir), "packed")
    return DEFAULT_CACHE


def build_dataset(cfg: TrainConfig, section: str = "dataset", tokenizer: Any = None) -> _BaseDataset:
    """Instantiate the tokenizer (unless given) and the dataset section of a config; a list of builders gives
    one :class:`~mirotrain.data.datasets.ConcatDataset` (packed as one dataset, one shard directory)."""
    from mirotrain.config import ConfigError

    ds_cfg = cfg.data.section(section)
    if ds_cfg is None:
        raise ConfigError(section, "missing dataset section")
    if tokenizer is None:
        if cfg.tokenizer.component is None:
            raise ConfigError("tokenizer", "missing tokenizer section")
        tokenizer = instantiate(cfg.tokenizer.component)
    options = ds_cfg.engine_options()
    names = [f"{section}.{i}" for i in range(len(ds_cfg.parts))] if ds_cfg.parts else [section]
    parts = [_build_one(where, {**builder, **options}, tokenizer) for where, builder in zip(names, ds_cfg.builders)]
    try:
        ds = ConcatDataset(parts) if ds_cfg.parts else parts[0]
    except ValueError as exc:
        raise ConfigError(section, str(exc)) from None
    return ds.with_one_pair_per_row(cfg.dpo.one_pair_per_row) if ds.kind == PreferenceDataset.kind else ds


def _build_one(where: str, node: dict, tokenizer: Any) -> _BaseDataset:
    """One builder node (``where`` names it in errors) with the section's engine keys."""
    from mirotrain.config import ConfigError

    if "_component_" not in node:
        raise ConfigError(f"{where}._component_", "missing")
    try:
        ds = instantiate(node, tokenizer=tokenizer)
    except (ValueError, TypeError) as exc:
        raise ConfigError(where, str(exc)) from None
    if not isinstance(ds, _BaseDataset):
        raise ConfigError(f"{where}._component_", f"{node['_component_']} did not build a MiroTrain dataset")
    return ds


def pack_dataset(cfg: TrainConfig, section: str = "dataset", *, tokenizer: Any = None, progress: bool = False,
                 num_workers: int | None = None, force: bool = False) -> str:
    """Pack the ``section`` of a config (cache hit if already packed); returns the shard directory."""
    ds = build_dataset(cfg, section, tokenizer)
    workers = num_workers if num_workers is not None else ds.options.num_workers
    out_dir, _ = pack(ds, output_root(cfg, section), num_workers=workers, progress=progress, force=force)
    return out_dir


def existing_shards(cfg: TrainConfig, section: str = "dataset", tokenizer: Any = None) -> str | None:
    """The shard directory ``section`` trains on if it is already packed (its ``shard_dir``, else the directory
    `mirotrain pack` fills), None if not packed yet. Builds the tokenizer and stats the data files; reads no
    sample."""
    ds_cfg = cfg.data.section(section)
    if ds_cfg is not None and ds_cfg.shard_dir:
        return str(ds_cfg.shard_dir)
    out_dir = shard_dir_for(build_dataset(cfg, section, tokenizer), output_root(cfg, section))
    return out_dir if manifest_exists(out_dir) else None


def summary_line(manifest: dict) -> str:
    keys = ["samples", "docs", "dropped", "skipped", "filtered", "truncated", "tokens", "trained_tokens", "rows"]
    parts = [f"{k}={manifest.get(k)}" for k in keys if k in manifest]
    if "pad_fraction" in manifest:
        parts.append(f"pad_fraction={manifest['pad_fraction']:.4f}")
    return " ".join(parts)


__all__ = ["encode_all", "existing_shards", "output_root", "pack", "pack_dataset", "read_manifest", "shard_dir_for",
           "summary_line"]
