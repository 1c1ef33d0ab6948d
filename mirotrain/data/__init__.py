"""The data path: formats -> messages -> (ids, mask) -> packed Arrow shards -> batches.

Modules: ``formats`` (sources to the message contract), ``sources`` (JSON/JSONL/Parquet on fsspec, HF
datasets), ``datasets`` (config builders), ``packing`` (best-fit decreasing), ``shards`` (Arrow writer,
memory-mapped reader, manifest), ``pack`` (``mirotrain pack``), ``preference`` (DPO rows), ``samplers``,
``collate``, ``streaming`` (streaming pack), ``loader`` (``build_train_loader``), ``demo`` (demo data).
Nothing heavy is imported here.
"""
