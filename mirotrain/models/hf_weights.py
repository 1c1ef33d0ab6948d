"""Model weights in Hugging Face format: load into a (possibly FSDP-sharded) model, save from one, build from one.

Loading streams tensor by tensor from (possibly sharded) safetensors, and for FSDP- or expert-sharded
parameters (DTensors) reads only the rows the rank owns, so no rank ever holds the full model. Saving gathers
one parameter at a time and hands its HF tensors to the one HF directory writer (``models/hf_writer.py``) on
rank 0. Which HF tensors make up a parameter is the family's state-dict adapter's business
(``models/families.py`` picks it by ``model_type``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from mirotrain.models.families import build_model, family_of
from mirotrain.models.hf_config import args_from_hf_config, hf_config_from_args
from mirotrain.models.hf_io import SafetensorsReader, localize, read_hf_config
from mirotrain.models.hf_writer import HFDirWriter, parse_size
from mirotrain.models.qwen3.model import Qwen3Args, Qwen3Transformer


def _local_rows(param: torch.Tensor) -> tuple[tuple[int, int] | None, torch.Tensor]:
    """(row range of dim 0 this rank holds, local tensor to fill) for a plain tensor or a DTensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return None, param
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise NotImplementedError("only dim-0 sharding is supported when loading HF weights")
    return (offset[0], offset[0] + shape[0]), local


@torch.no_grad()
def load_hf_weights(model: nn.Module, checkpoint_dir: str | os.PathLike, strict: bool = True) -> None:
    """Fill ``model``'s parameters (plain or sharded on dim 0) from an HF safetensors checkpoint.

    Each rank reads only its own rows of each tensor. Tied checkpoints may omit ``lm_head.weight``; with
    ``strict`` a checkpoint tensor the model has no parameter for is an error.
    """
    adapter = family_of(model.args).adapter
    reader = SafetensorsReader(localize(checkpoint_dir))
    state = model.state_dict()
    for native, param in state.items():
        rows, local = _local_rows(param)
        tensor = adapter.from_hf(native, tuple(param.shape), reader.read, rows)
        if tuple(tensor.shape) != tuple(local.shape[: tensor.dim()]) or tensor.shape[0] > local.shape[0]:
            raise ValueError(f"{checkpoint_dir}: {native}: checkpoint shape {tuple(tensor.shape)} does not fit "
                             f"parameter shard {tuple(local.shape)} (model shape {tuple(param.shape)})")
        local[: tensor.shape[0]].copy_(tensor.to(local.dtype))
    if strict:
        expected = adapter.hf_names({native: tuple(p.shape) for native, p in state.items()})
        extra = sorted(set(reader.weight_map) - expected - {"lm_head.weight"})
        if extra:
            raise ValueError(f"{checkpoint_dir}: unexpected tensors in checkpoint, e.g. {extra[:5]}")


def from_pretrained(path_or_url: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", **overrides: Any) -> Qwen3Transformer:
    """Build a model from an HF checkpoint directory or fsspec URL (config.json + safetensors)."""
    local = localize(path_or_url)
    args = args_from_hf_config(read_hf_config(local), **overrides)
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    model.rope.reset_parameters()
    load_hf_weights(model, local)
    return model


def _hf_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on CPU) one at a time; DTensors are gathered (a collective on every rank)."""
    from torch.distributed.tensor import DTensor

    adapter = family_of(model.args).adapter
    for native, param in model.state_dict().items():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        yield from adapter.to_hf(native, full.detach().to("cpu", dtype))


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype = torch.bfloat16,
                    is_writer: bool | None = None, base_dir: str | os.PathLike | None = None) -> Path | None:
    """Write ``model`` as an HF checkpoint (config.json, sharded safetensors + index, tokenizer files) through
    :class:`~mirotrain.models.hf_writer.HFDirWriter` (files 0644, directories 0755).

    ``base_dir`` is the checkpoint training started from (None: random initialisation): the export keeps its
    special token ids (a -Base model's ``eos_token_id`` is ``<|endoftext|>``, not the chat models'
    ``<|im_end|>``) and its ``generation_config.json``.

    Under torch.distributed every rank must call this (parameters are gathered one by one); only rank 0
    (or ``is_writer``) writes. Tied models write no ``lm_head.weight``, as the published checkpoints do.
    """
    import torch.distributed as dist

    args: Qwen3Args = model.args
    if is_writer is None:
        is_writer = not dist.is_initialized() or dist.get_rank() == 0
    limit = parse_size(max_shard_size)  # on every rank: a bad size must not leave the others in a collective
    writer = HFDirWriter(out_dir, limit) if is_writer else None
    for name, tensor in _hf_tensors(model, dtype):
        if writer is not None:
            writer.add(name, tensor)
    if writer is None:
        return None
    base_config = read_hf_config(base_dir) if base_dir is not None else None
    writer.finish(hf_config_from_args(args, dtype, base_config), tokenizer_dir, base_dir)
    return writer.out
