"""The cache of DPO reference log-probs: a copy of the packed shard directory with two per-pair columns.

The reference model is frozen, so its log-prob of every chosen/rejected response is a constant of the data.
The columns ``ref_chosen_logp`` / ``ref_rejected_logp`` are written into ``{shard_dir}.ref-{key}``, where
``key`` hashes the reference weights (config + safetensors headers + file sizes + sampled bytes), the packed
data (the shard manifest's dataset/tokenizer hashes and row count), the compute dtype and the attention
backend. A finished directory has its manifest (written last), so a crashed pass is simply redone and a
finished one is reused by every later run, including the `--precompute-only` pipeline step followed by
training.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
CACHE_VERSION = 1
_SAMPLE_BYTES = 1 << 16
_SAMPLES_PER_FILE = 8


def _fingerprint_file(h: "hashlib._Hash", path: Path) -> None:
    """Size, safetensors header and a few sampled blocks: cheap, and changes whenever the weights do."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 26)))
        for k in range(_SAMPLES_PER_FILE):
            f.seek(max(0, (size - _SAMPLE_BYTES) * k // max(1, _SAMPLES_PER_FILE - 1)))
            h.update(f.read(_SAMPLE_BYTES))


def model_fingerprint(model_dir: str | None) -> str:
    """Hash of an HF checkpoint directory's config and weights (``random-init`` when there is none)."""
    if model_dir is None:
        return "random-init"
    from mirotrain.models.hf_io import localize

    root = Path(localize(model_dir))
    h = hashlib.sha256()
    for name in ("config.json",):
        if (root / name).exists():
            h.update((root / name).read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        _fingerprint_file(h, path)
    return h.hexdigest()


def reference_cache_key(model_dir: str | None, shard_manifest: Mapping[str, Any], *, dtype: str,
                        attention_backend: str = "auto", extra: Mapping[str, Any] | None = None) -> str:
    """Key of a reference pass: weights x packed data x numerics (dtype, attention backend)."""
    data = {k: shard_manifest.get(k) for k in ("dataset_hash", "tokenizer_hash", "rows", "packed_seq_len",
                                               "docs", "packing", "schema_version")}
    payload = {"version": CACHE_VERSION, "model": model_fingerprint(model_dir), "data": data, "dtype": dtype,
               "attention_backend": attention_backend, **(dict(extra) if extra else {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_shard_dir(shard_dir: str, key: str) -> str:
    return f"{shard_dir.rstrip('/')}.ref-{key}"


def has_reference_columns(shard_dir: str) -> bool:
    from mirotrain.data.shards import manifest_exists, read_manifest

    if not manifest_exists(shard_dir):
        return False
    return set(REF_COLUMNS) <= set(read_manifest(shard_dir).get("extra_pair_columns", []))


def num_pair_ids(reader: Any) -> int:
    """``max pair id + 1`` over every row (size of the per-pair column arrays)."""
    top = -1
    for i in range(len(reader)):
        ids = reader.row(i)["pair_ids"]
        if len(ids):
            top = max(top, int(np.max(ids)))
    return top + 1


def write_reference_dir(shard_dir: str, out_dir: str, columns: Mapping[str, torch.Tensor],
                        info: Mapping[str, Any] | None = None) -> str:
    """Write ``out_dir`` = ``shard_dir`` + the reference columns (manifest last = complete)."""
    from mirotrain.data.preference import add_pair_columns

    add_pair_columns(shard_dir, out_dir, dict(columns))
    if info:
        log.info("reference log-probs written to %s (%s)", out_dir, dict(info))
    return out_dir
