"""`checkpointer:` section — where the base HF weights come from and how HF exports are written.

MiroTrain configs name ``torchtune.training.FullModelHFCheckpointer``; it resolves to this class. Loading
streams the safetensors into the (possibly FSDP-sharded) model; each rank reads only its own rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mirotrain.models.hf_io import localize, read_hf_config
from mirotrain.models.hf_weights import load_hf_weights, save_pretrained

MODEL_TYPES = ("QWEN3", "QWEN3_MoE", "QWEN3_MOE")


class FullModelHFCheckpointer:
    """Base weights in HF format (``checkpoint_dir``) and the HF export settings.

    Args:
        checkpoint_dir: local directory or fsspec URL of an HF checkpoint (config.json + safetensors).
            ``null`` trains from random initialisation (benchmarks, tests).
        checkpoint_files: accepted for compatibility; the safetensors index (or the directory listing)
            decides which files are read.
        model_type: ``QWEN3`` or ``QWEN3_MoE``; checked against config.json's model_type.
        output_dir: accepted for compatibility; exports go to ``{output_dir}/hf/`` of the run.
        max_shard_size: size of each exported safetensors shard.
    """

    def __init__(self, checkpoint_dir: str | None = None, checkpoint_files: Any = None, model_type: str = "QWEN3",
                 output_dir: str | None = None, recipe_checkpoint: str | None = None,
                 resume_from_checkpoint: bool = False, safe_serialization: bool = True,
                 use_grouped_gemm: bool = True, enable_dcp: bool = False, max_shard_size: str = "5GB",
                 should_load_recipe_state: bool = False, adapter_checkpoint: str | None = None):
        if model_type not in MODEL_TYPES:
            raise ValueError(f"checkpointer.model_type must be one of {MODEL_TYPES[:2]}, got {model_type!r}")
        if not safe_serialization:
            raise ValueError("checkpointer.safe_serialization: only safetensors are written (no pickled weights)")
        if adapter_checkpoint:
            raise ValueError("checkpointer.adapter_checkpoint: LoRA adapters are not supported (full fine-tuning only)")
        self.checkpoint_dir = checkpoint_dir
        self.model_type = "qwen3_moe" if model_type.upper() == "QWEN3_MOE" else "qwen3"
        self.max_shard_size = max_shard_size

    def hf_config(self) -> dict[str, Any] | None:
        if self.checkpoint_dir is None:
            return None
        config = read_hf_config(self.checkpoint_dir)
        if config.get("model_type") != self.model_type:
            raise ValueError(f"{self.checkpoint_dir}/config.json has model_type {config.get('model_type')!r} but "
                             f"checkpointer.model_type says {self.model_type!r}")
        return config

    def load_into(self, model: nn.Module) -> None:
        """Fill a materialised (possibly sharded) model with the base weights."""
        if self.checkpoint_dir is None:
            raise ValueError("checkpointer.checkpoint_dir is null: there are no base weights to load")
        load_hf_weights(model, localize(self.checkpoint_dir))

    def save(self, model: nn.Module, out_dir: str | os.PathLike, tokenizer_dir: str | None = None,
             dtype: torch.dtype = torch.bfloat16) -> Path | None:
        """Export ``model`` to ``out_dir`` keeping the base checkpoint's token ids and generation config."""
        return save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir or self.checkpoint_dir,
                               max_shard_size=self.max_shard_size, dtype=dtype, base_dir=self.checkpoint_dir)
