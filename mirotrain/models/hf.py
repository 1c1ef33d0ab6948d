"""Hugging Face format at the edges: config.json <-> model args, safetensors <-> native state dict.

Loading streams tensor by tensor from (possibly sharded) safetensors, and for FSDP-sharded parameters
(DTensors) reads only the rows the rank owns, so no rank ever holds the full model. Saving gathers one
parameter at a time and hands it to the one HF directory writer (``hf_writer.py``) on rank 0. Weights are only ever read from
safetensors: nothing here unpickles a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import torch
from safetensors import safe_open
from torch import nn

from mirotrain.models.hf_writer import HFDirWriter, parse_size
from mirotrain.models.qwen3.model import Qwen3Args, Qwen3Transformer

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")

# ---------------------------------------------------------------------------------------------- config


def args_from_hf_config(config: dict[str, Any], **overrides: Any) -> Qwen3Args:
    """Model args from an HF ``config.json`` dict (qwen3 or qwen3_moe)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or None
    theta = config.get("rope_theta") or (rope or {}).get("rope_theta") or 1_000_000.0
    if rope is not None:
        rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
    fields: dict[str, Any] = dict(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_seq_len=config.get("max_position_embeddings", 40960),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), rope_scaling=rope,
    )
    if model_type == "qwen3_moe":
        fields.update(
            # published Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts
            num_experts=config.get("num_experts") or config["num_local_experts"], num_experts_per_tok=config["num_experts_per_tok"],
            moe_hidden_dim=config["moe_intermediate_size"], norm_topk_prob=config.get("norm_topk_prob", True),
            decoder_sparse_step=config.get("decoder_sparse_step", 1), mlp_only_layers=list(config.get("mlp_only_layers") or []),
            router_aux_loss_coef=config.get("router_aux_loss_coef", 0.001),
        )
    fields.update(overrides)
    return Qwen3Args(**fields)


def hf_config_from_args(args: Qwen3Args, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json in the layout of the published Qwen3 checkpoints (read by transformers and vLLM)."""
    config: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if args.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if args.is_moe else "qwen3",
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": args.head_dim, "hidden_act": "silu", "hidden_size": args.dim,
        "initializer_range": 0.02, "intermediate_size": args.hidden_dim,
        "max_position_embeddings": args.max_seq_len, "max_window_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads, "rms_norm_eps": args.norm_eps,
        "rope_scaling": dict(args.rope_scaling) if args.rope_scaling else None,
        "rope_theta": args.rope_theta, "sliding_window": None, "use_sliding_window": False,
        "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True, "vocab_size": args.vocab_size,
    }
    if args.is_moe:
        config.update(
            num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
            moe_intermediate_size=args.moe_hidden_dim, norm_topk_prob=args.norm_topk_prob,
            decoder_sparse_step=args.decoder_sparse_step, mlp_only_layers=list(args.mlp_only_layers),
            router_aux_loss_coef=args.router_aux_loss_coef, output_router_logits=False,
        )
    return config


# ------------------------------------------------------------------------------------------ key mapping

_DENSE_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

# MoE adapters extend this: a function native_name -> list of (hf_name, row_slice_in_native) or None.
_EXTRA_MAPPERS: list[Callable[[str, tuple[int, ...]], list[tuple[str, int]] | None]] = []


def register_key_mapper(fn: Callable[[str, tuple[int, ...]], list[tuple[str, int]] | None]) -> None:
    """Register a mapping for parameters stored as several HF tensors stacked along dim 0 (MoE experts).

    ``fn(native_name, native_shape)`` returns ``[(hf_name, rows), ...]`` in stacking order (each HF
    tensor contributing ``rows`` rows; ``rows == 0`` means the HF tensor is unsqueezed into one row) or
    None if it does not handle that name.
    """
    _EXTRA_MAPPERS.append(fn)


def hf_parts(native: str, shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """The HF tensors that make up native parameter ``native``, with the rows each contributes."""
    if native in _TOP_KEYS:
        return [(_TOP_KEYS[native], shape[0] if shape else 0)]
    m = _LAYER_RE.match(native)
    if m and m.group(2) in _DENSE_LAYER_KEYS:
        return [(f"model.layers.{m.group(1)}.{_DENSE_LAYER_KEYS[m.group(2)]}", shape[0] if shape else 0)]
    for mapper in _EXTRA_MAPPERS:
        parts = mapper(native, shape)
        if parts is not None:
            return parts
    raise KeyError(f"no Hugging Face name for parameter {native!r}")


def _import_family_mappers(args: Qwen3Args) -> None:
    if args.is_moe:
        import mirotrain.models.qwen3_moe  # noqa: F401  (registers the expert key mapper)


# ------------------------------------------------------------------------------------------ reading


def _is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def localize(path_or_url: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local directory holding the checkpoint: the path itself, or a copy of a remote fsspec URL."""
    text = str(path_or_url)
    if not _is_remote(text):
        local = Path(text.removeprefix("file://"))
        if not local.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {local}")
        return local
    fs, root = fsspec.core.url_to_fs(text)
    if not fs.isdir(root):
        raise FileNotFoundError(f"checkpoint directory not found: {text}")
    target = Path(cache_dir or tempfile.mkdtemp(prefix="mirotrain-ckpt-"))
    target.mkdir(parents=True, exist_ok=True)
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if fs.isfile(entry) and not (target / name).exists():
            fs.get(entry, str(target / name))
    return target


class SafetensorsReader:
    """Reads named tensors (or row ranges of them) from a directory of safetensors shards, lazily."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    weight_map.update({k: f.name for k in handle.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        if file not in self._handles:
            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in model.safetensors.index.json) is missing")
            self._handles[file] = safe_open(str(path), framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        return sl[rows[0]:rows[1]] if rows is not None else sl[:]


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


def _read_native(reader: SafetensorsReader, native: str, shape: tuple[int, ...], rows: tuple[int, int] | None) -> torch.Tensor:
    parts = hf_parts(native, shape)
    if len(parts) == 1 and parts[0][1] != 0:
        return reader.read(parts[0][0], rows)
    # stacked: HF tensors each contribute rows of the native tensor (rows == 0: one unsqueezed row)
    start, stop = rows if rows is not None else (0, shape[0])
    pieces, cursor = [], 0
    for hf_name, n in parts:
        n_rows = n or 1
        lo, hi = max(start, cursor), min(stop, cursor + n_rows)
        if lo < hi:
            if n == 0:
                pieces.append(reader.read(hf_name).unsqueeze(0))
            else:
                pieces.append(reader.read(hf_name, (lo - cursor, hi - cursor)))
        cursor += n_rows
    return torch.cat(pieces) if pieces else torch.empty((0, *shape[1:]))


@torch.no_grad()
def load_hf_weights(model: nn.Module, checkpoint_dir: str | os.PathLike, strict: bool = True) -> None:
    """Fill ``model``'s parameters (plain or FSDP-sharded) from an HF safetensors checkpoint.

    Each rank reads only its own rows of each tensor. Tied checkpoints may omit ``lm_head.weight``.
    """
    args: Qwen3Args = model.args
    _import_family_mappers(args)
    reader = SafetensorsReader(localize(checkpoint_dir))
    for native, param in model.state_dict().items():
        rows, local = _local_rows(param)
        tensor = _read_native(reader, native, tuple(param.shape), rows)
        if tuple(tensor.shape) != tuple(local.shape[: tensor.dim()]) or tensor.shape[0] > local.shape[0]:
            raise ValueError(f"{checkpoint_dir}: {native}: checkpoint shape {tuple(tensor.shape)} does not fit "
                             f"parameter shard {tuple(local.shape)} (model shape {tuple(param.shape)})")
        local[: tensor.shape[0]].copy_(tensor.to(local.dtype))
    if strict:
        expected = {name for native, p in model.state_dict().items() for name, _ in hf_parts(native, tuple(p.shape))}
        extra = sorted(set(reader.weight_map) - expected - {"lm_head.weight"})
        if extra:
            raise ValueError(f"{checkpoint_dir}: unexpected tensors in checkpoint, e.g. {extra[:5]}")


def read_hf_config(path_or_url: str | os.PathLike) -> dict[str, Any]:
    with fsspec.open(f"{str(path_or_url).rstrip('/')}/config.json", "r") as f:
        return json.load(f)


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


def build_model(args: Qwen3Args, device: str | torch.device = "meta") -> Qwen3Transformer:
    """Dense or MoE model for ``args`` on ``device`` (``meta`` builds without allocating)."""
    with torch.device(device):
        if args.is_moe:
            from mirotrain.models.qwen3_moe.model import Qwen3MoeTransformer

            return Qwen3MoeTransformer(args)
        return Qwen3Transformer(args)


# ------------------------------------------------------------------------------------------ writing


def _full_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on CPU) one at a time; DTensors are gathered (a collective on every rank)."""
    from torch.distributed.tensor import DTensor

    for native, param in model.state_dict().items():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        full = full.detach().to("cpu", dtype)
        parts = hf_parts(native, tuple(full.shape))
        cursor = 0
        for hf_name, n in parts:
            if n == 0:
                yield hf_name, full[cursor].contiguous()
                cursor += 1
            else:
                yield hf_name, full[cursor:cursor + n].contiguous()
                cursor += n


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype = torch.bfloat16,
                    is_writer: bool | None = None) -> Path | None:
    """Write ``model`` as an HF checkpoint (config.json, sharded safetensors + index, tokenizer files) through
    :class:`~mirotrain.models.hf_writer.HFDirWriter` (files 0644, directories 0755).

    Under torch.distributed every rank must call this (parameters are gathered one by one); only rank 0
    (or ``is_writer``) writes. Tied models write no ``lm_head.weight``, as the published checkpoints do.
    """
    import torch.distributed as dist

    args: Qwen3Args = model.args
    _import_family_mappers(args)
    if is_writer is None:
        is_writer = not dist.is_initialized() or dist.get_rank() == 0
    limit = parse_size(max_shard_size)  # on every rank: a bad size must not leave the others in a collective
    writer = HFDirWriter(out_dir, limit) if is_writer else None
    for name, tensor in _full_tensors(model, dtype):
        if writer is not None:
            writer.add(name, tensor)
    if writer is None:
        return None
    writer.finish(hf_config_from_args(args, dtype), tokenizer_dir)
    return writer.out
