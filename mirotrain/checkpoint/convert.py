"""Step checkpoint (DCP) -> Hugging Face safetensors, streaming, on one CPU process.

The source is a step checkpoint ``OUT/checkpoints/step_N`` or a run directory ``OUT`` (its newest complete
step checkpoint: for a finished run, the final step). Reads the model entries one tensor at a time (DCP
gathers a tensor's shards from every rank's file), casts it to the export dtype and hands it to the HF
directory writer (``models/hf_writer.py``, shared with the in-training export), so peak host memory is one
shard of the export plus one fp32 tensor (≈1.2× the bf16 model at most for the largest models: the
embedding is the biggest single tensor). Writes ``config.json`` (``rope_scaling`` kept for yarn), sharded
weights + index, and the tokenizer files, readable by every user; the result loads with
``transformers.AutoModelForCausalLM.from_pretrained``.

The model architecture comes from the checkpoint's ``meta.json`` (written with every step checkpoint), or
from ``--config`` when given. The special token ids and ``generation_config.json`` come from the base
checkpoint the run started from (the ``checkpointer.checkpoint_dir`` of the run's config in ``meta.json``),
as in the in-training export.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from mirotrain.checkpoint.layout import CheckpointInputError, read_meta, resolve_checkpoint
from mirotrain.models.families import build_model, family_of
from mirotrain.models.hf_config import hf_config_from_args
from mirotrain.models.hf_io import read_hf_config
from mirotrain.models.hf_writer import HFDirWriter
from mirotrain.models.qwen3.model import Qwen3Args

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
MODEL_PREFIX = "model."


def model_args_for(checkpoint: Path, config_path: str | None = None, overrides: list[str] | None = None) -> Qwen3Args:
    """The model architecture: from ``--config`` (its ``model`` builder, run on meta) or the checkpoint's meta.json."""
    if config_path is not None:
        from mirotrain.config import instantiate, load_config

        with torch.device("meta"):
            return instantiate(load_config(config_path, overrides or [])["model"]).args
    meta = read_meta(checkpoint)
    fields = dict(meta["model_args"])
    return Qwen3Args(**{k: v for k, v in fields.items() if k in Qwen3Args.__dataclass_fields__})


def base_checkpoint_dir(meta: dict[str, Any]) -> str | None:
    """The base checkpoint of the run that wrote ``meta`` (None: random initialisation, or not reachable here,
    with a warning: the export then gets the random-initialisation token ids)."""
    base = ((meta.get("config") or {}).get("checkpointer") or {}).get("checkpoint_dir")
    if base is None:
        return None
    try:
        read_hf_config(base)
    except OSError:
        log.warning("The run's base checkpoint %s is not readable here: the export's config.json gets the chat "
                    "models' special token ids (eos_token_id 151645), not the base model's own.", base)
        return None
    return base


def _native_names(args: Qwen3Args) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in model order (the order HF exports list them in)."""
    model = build_model(args, device="meta")
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _read_tensors(checkpoint: Path, names: list[tuple[str, tuple[int, ...]]]) -> Iterator[tuple[str, torch.Tensor]]:
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for name, shape in names:
        key = MODEL_PREFIX + name
        item = metadata.get(key)
        if item is None:
            raise CheckpointInputError(f"{checkpoint}: the checkpoint has no tensor {key!r} (model/config mismatch?)")
        if tuple(item.size) != shape:
            raise CheckpointInputError(f"{checkpoint}: {key} has shape {tuple(item.size)}, the model expects {shape}")
        tensor = torch.empty(shape, dtype=item.properties.dtype)
        dcp.load({"model": {name: tensor}}, storage_reader=FileSystemReader(str(checkpoint)), no_dist=True)
        yield name, tensor


def convert_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, config_path: str | None = None,
                       overrides: list[str] | None = None, dtype: str | None = None, max_shard_size: int | str = "5GB",
                       tokenizer_dir: str | None = None, progress: bool = True) -> Path:
    """Convert ``checkpoint`` to an HF directory ``output``; returns ``output``.

    ``checkpoint`` is a step checkpoint or a training output_dir, whose newest complete step checkpoint is
    converted (:func:`~mirotrain.checkpoint.layout.resolve_checkpoint`); a finished run's is its final step.
    Raises :class:`~mirotrain.checkpoint.layout.CheckpointInputError` when it names nothing usable.
    """
    from tqdm import tqdm

    step_dir = resolve_checkpoint(checkpoint)
    if step_dir.path != Path(checkpoint):
        log.info("Converting %s, the newest complete step checkpoint of %s", step_dir.path, checkpoint)
    checkpoint = step_dir.path
    meta = read_meta(checkpoint)
    args = model_args_for(checkpoint, config_path, overrides)
    out_dtype = DTYPES[dtype or meta.get("dtype", "bf16")]
    tokenizer_dir = tokenizer_dir or meta.get("tokenizer_dir")
    if not tokenizer_dir:
        log.warning("No tokenizer directory known (pass --tokenizer); the export has no tokenizer files.")
    names = _native_names(args)
    writer = HFDirWriter(output, max_shard_size)
    bar = tqdm(total=len(names), desc="convert", unit="tensor", disable=not progress)
    adapter = family_of(args).adapter
    for native, tensor in _read_tensors(checkpoint, names):
        for hf_name, piece in adapter.to_hf(native, tensor.to(out_dtype)):
            writer.add(hf_name, piece)
        del tensor
        bar.update(1)
    bar.close()
    base_dir = base_checkpoint_dir(meta)
    base_config = read_hf_config(base_dir) if base_dir is not None else None
    weight_map = writer.finish(hf_config_from_args(args, out_dtype, base_config), tokenizer_dir, base_dir)
    log.info("Converted %s (step %s) to %s: %d tensors, %d shard(s), %s", checkpoint, step_dir.step, writer.out,
             len(weight_map), writer.n_shards, str(out_dtype).removeprefix("torch."))
    return writer.out


def describe(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a step checkpoint (step, epoch, seed, model args, ...)."""
    return read_meta(Path(checkpoint))
