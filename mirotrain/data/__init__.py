"""The data path: formats -> messages -> (ids, mask) -> packed Arrow shards -> batches.

Modules: ``formats`` (sources to the message contract), ``sources`` (JSON/JSONL/Parquet on fsspec, HF
datasets), ``render`` (chat template + loss mask), ``truncation`` (the cut of a too-long sample),
``datasets`` (config builders), ``packing`` (which documents share a row, and the row layout),
``shards`` (Arrow writer, memory-mapped reader, manifest), ``pack_shards`` (the offline packer behind
``mirotrain pack``), ``streaming`` (the streaming packer), ``preference`` (DPO rows), ``samplers``,
``batch`` (typed batches), ``collate`` (rows -> batches), ``loader`` (``build_train_loader``: reads shards
or drives the streaming packer), ``demo`` (demo data).
Nothing heavy is imported here.
"""

from typing import Any


def pack_dataset(cfg: dict, section: str = "dataset", **kwargs: Any) -> str:
    """Pack ``cfg[section]`` to Arrow shards (a cache hit if already packed); returns the shard dir."""
    from mirotrain.data.pack_shards import pack_dataset as pack

    return pack(cfg, section, **kwargs)


def read_manifest(shard_dir: str) -> dict:
    """The ``manifest.json`` of a shard directory."""
    from mirotrain.data.shards import read_manifest as read

    return read(shard_dir)
