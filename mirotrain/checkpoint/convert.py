"""Step checkpoint (DCP) -> Hugging Face safetensors, streaming, on one CPU process.

Reads the model entries of ``OUT/checkpoints/step_N`` one tensor at a time (DCP gathers a tensor's shards
from every rank's file), casts it to the export dtype and appends it to the current safetensors shard, so
peak host memory is one shard of the export plus one fp32 tensor (≈1.2× the bf16 model at most for the
largest models: the embedding is the biggest single tensor). Writes ``config.json`` (``rope_scaling`` kept for
yarn), sharded weights + index, and the tokenizer files; the result loads with
``transformers.AutoModelForCausalLM.from_pretrained``.

The model architecture comes from the checkpoint's ``meta.json`` (written with every step checkpoint), or
from ``--config`` when given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from mirotrain.checkpoint.layout import check_step_dir, read_meta
from mirotrain.models.hf import copy_tokenizer_files, hf_config_from_args, hf_parts
from mirotrain.models.qwen3.model import Qwen3Args

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
MODEL_PREFIX = "model."


def _parse_size(size: int | str) -> int:
    from mirotrain.models.hf import _parse_size as parse

    return parse(size)


def model_args_for(checkpoint: Path, config_path: str | None = None, overrides: list[str] | None = None) -> Qwen3Args:
    """The model architecture: from ``--config`` (built on meta) or the checkpoint's meta.json."""
    if config_path is not None:
        from mirotrain.config import load_config
        from mirotrain.training.builders import build_meta_model

        return build_meta_model(load_config(config_path, overrides or [])).args
    meta = read_meta(checkpoint)
    fields = dict(meta["model_args"])
    return Qwen3Args(**{k: v for k, v in fields.items() if k in Qwen3Args.__dataclass_fields__})


def _native_names(args: Qwen3Args) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in model order (the order HF exports list them in)."""
    from mirotrain.models.hf import build_model

    model = build_model(args, device="meta")
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _read_tensors(checkpoint: Path, names: list[tuple[str, tuple[int, ...]]]) -> Iterator[tuple[str, torch.Tensor]]:
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for name, shape in names:
        key = MODEL_PREFIX + name
        item = metadata.get(key)
        if item is None:
            raise KeyError(f"{checkpoint}: the checkpoint has no tensor {key!r} (model/config mismatch?)")
        if tuple(item.size) != shape:
            raise ValueError(f"{checkpoint}: {key} has shape {tuple(item.size)}, the model expects {shape}")
        tensor = torch.empty(shape, dtype=item.properties.dtype)
        dcp.load({"model": {name: tensor}}, storage_reader=FileSystemReader(str(checkpoint)), no_dist=True)
        yield name, tensor


def convert_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, config_path: str | None = None,
                       overrides: list[str] | None = None, dtype: str | None = None, max_shard_size: int | str = "5GB",
                       tokenizer_dir: str | None = None, progress: bool = True) -> Path:
    """Convert step checkpoint ``checkpoint`` to an HF directory ``output``; returns ``output``."""
    from tqdm import tqdm

    checkpoint = Path(checkpoint)
    problem = check_step_dir(checkpoint)
    if problem is not None:
        raise ValueError(f"{checkpoint} is not a usable step checkpoint: {problem}")
    meta = read_meta(checkpoint)
    args = model_args_for(checkpoint, config_path, overrides)
    if args.is_moe:
        import mirotrain.models.qwen3_moe  # noqa: F401  (registers the expert key mapping)
    out_dtype = DTYPES[dtype or meta.get("dtype", "bf16")]
    tokenizer_dir = tokenizer_dir or meta.get("tokenizer_dir")
    limit = _parse_size(max_shard_size)
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    names = _native_names(args)
    shards: list[list[str]] = []
    buffer: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buffer, size
        if buffer:
            save_file(buffer, str(tmp / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(buffer))
        buffer, size = {}, 0

    bar = tqdm(total=len(names), desc="convert", unit="tensor", disable=not progress)
    for native, tensor in _read_tensors(checkpoint, names):
        tensor = tensor.to(out_dtype)
        cursor = 0
        for hf_name, rows in hf_parts(native, tuple(tensor.shape)):
            piece = tensor[cursor] if rows == 0 else tensor[cursor:cursor + rows]
            cursor += 1 if rows == 0 else rows
            piece = piece.contiguous()
            nbytes = piece.numel() * piece.element_size()
            if buffer and size + nbytes > limit:
                flush()
            buffer[hf_name] = piece
            size += nbytes
            total += nbytes
        del tensor
        bar.update(1)
    flush()
    bar.close()

    weight_map: dict[str, str] = {}
    for i, hf_names in enumerate(shards):
        final = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors")
        (tmp / f"part-{i:05d}.safetensors").rename(tmp / final)
        weight_map.update({n: final for n in hf_names})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config_from_args(args, out_dtype), indent=2))
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, tmp)
    else:
        log.warning("No tokenizer directory known (pass --tokenizer); the export has no tokenizer files.")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("Converted %s (step %s) to %s: %d tensors, %d shard(s), %s", checkpoint, meta.get("step"), out,
             len(weight_map), len(shards), str(out_dtype).removeprefix("torch."))
    return out


def describe(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a step checkpoint (step, epoch, seed, model args, ...)."""
    return read_meta(Path(checkpoint))
