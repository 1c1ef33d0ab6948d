"""Build the parts of a run from its config: model (meta -> parallelised -> materialised -> weights), loss,
optimizer, LR schedule, tokenizer, data loaders. Each builder reads config values through the schema defaults
(mirotrain.config.schema.KEYS) so a missing key means its documented default.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from mirotrain.config import instantiate
from mirotrain.config.schema import KEYS

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cfg_value(cfg: dict, key: str) -> Any:
    """``cfg[key]`` or the schema default (a key the schema does not know is a programming error)."""
    if key not in KEYS:
        raise KeyError(f"{key!r} is not a config key of mirotrain.config.schema.KEYS")
    value = cfg.get(key)
    return KEYS[key].default if value is None and key not in cfg else value


# ------------------------------------------------------------------------------------------------ model


def build_meta_model(cfg: dict) -> nn.Module:
    """The model on the meta device (no memory), with the configured attention backend."""
    node = dict(cfg["model"])
    node.setdefault("attention_backend", cfg_value(cfg, "attention_backend"))
    with torch.device("meta"):
        model = instantiate(node)
    return model


def check_against_checkpoint(model: nn.Module, hf_config: dict | None) -> None:
    """Fail early, naming the field, when the builder and the checkpoint's config.json disagree."""
    if hf_config is None:
        return
    from mirotrain.models.hf_config import args_from_hf_config

    ckpt = args_from_hf_config(hf_config)
    a = model.args
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                  "tie_word_embeddings", "num_experts"):
        if getattr(ckpt, field) != getattr(a, field):
            raise ValueError(f"model builder and checkpoint disagree on {field}: builder {getattr(a, field)!r}, "
                             f"checkpoint config.json {getattr(ckpt, field)!r}")


def materialize(model: nn.Module, device: torch.device, cpu_offload: bool) -> None:
    """Allocate the (sharded) parameters on their device; RoPE buffers on the compute device."""
    model.to_empty(device="cpu" if cpu_offload else device)
    model.rope.to(device)
    model.rope.reset_parameters()


def init_device_signature(device: torch.device) -> str:
    """What a seeded random init depends on besides the seed: the generator's device type and, on CUDA,
    the SM count (``normal_`` sizes its launch grid, and so its random stream, by it)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda:{props.name}:{props.multi_processor_count}"
    return device.type


@torch.no_grad()
def init_random(model: nn.Module, seed: int) -> None:
    """Random initialisation that also works on FSDP-sharded parameters.

    The model's own ``init_weights`` draws each full tensor from one seeded generator and copies it in;
    under ``implicit_replication`` that copy into a DTensor keeps only the local rows, so every world size
    gives the same weights (and only one full tensor at a time is ever in memory). The generator lives on
    the parameters' device: on CUDA that turns ~1 minute of CPU sampling per rank (8B) into about a second.
    """
    from torch.distributed.tensor.experimental import implicit_replication

    device = next(model.parameters()).device
    with implicit_replication():
        model.init_weights(seed=seed, device=device)


# ----------------------------------------------------------------------------------------- loss, optim


def build_loss(cfg: dict) -> nn.Module:
    node = cfg_value(cfg, "loss")
    if node is None:
        from mirotrain.modules.loss import LinearCrossEntropyLoss

        return LinearCrossEntropyLoss()
    return instantiate(node)


def build_optimizer(cfg: dict, model: nn.Module, device: torch.device, cpu_offload: bool) -> torch.optim.Optimizer:
    """The configured optimizer over all parameters; Adam(W) is fused by default (torch has fused CPU and
    CUDA kernels; CPU-resident parameters under fsdp_cpu_offload use the CPU kernel)."""
    node = dict(cfg["optimizer"])
    node.pop("params", None)
    name = node.get("_component_", "")
    if (name.endswith("AdamW") or name.endswith("Adam")) and node.get("fused") is None and not node.get("foreach"):
        node["fused"] = True
    return instantiate(node, params=[p for p in model.parameters() if p.requires_grad])


def build_lr_scheduler(cfg: dict, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The configured schedule with ``num_training_steps`` injected; constant LR when none is configured."""
    node = cfg_value(cfg, "lr_scheduler")
    if node is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    node = {k: v for k, v in node.items() if k not in ("optimizer", "num_training_steps", "last_epoch")}
    return instantiate(node, optimizer=optimizer, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------- data


def build_tokenizer(cfg: dict) -> Any:
    node = cfg.get("tokenizer")
    if node is None:
        return None
    return instantiate(node)


def tokenizer_dir(cfg: dict) -> str | None:
    """Directory of the tokenizer files to copy into HF exports: tokenizer.path, else the base checkpoint, else
    (``path: null``) the bundled Qwen3 tokenizer the tokenizer itself falls back to."""
    path = (cfg.get("tokenizer") or {}).get("path")
    if path:
        return str(path)
    base = (cfg.get("checkpointer") or {}).get("checkpoint_dir")
    if base:
        return str(base)
    if cfg.get("tokenizer") is not None:
        from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir

        return str(bundled_tokenizer_dir())
    return None


def build_loader(cfg: dict, section: str, *, dp_rank: int, dp_size: int, seed: int, tokenizer: Any) -> Any:
    from mirotrain.data.loader import build_train_loader

    return build_train_loader(cfg, section, dp_rank=dp_rank, dp_size=dp_size, seed=seed, tokenizer=tokenizer)
