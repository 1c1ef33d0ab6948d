"""The embedded default's model: a tiny random Qwen3 written as a real HF checkpoint.

It has the full Qwen3 vocabulary (so the real tokenizer's ids are valid) and the real Qwen3 tokenizer
files, so everything downstream — download, pack, SFT, DPO, export, transformers generate — runs the
same code paths as for a published checkpoint, on a laptop CPU in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mirotrain.models.hf_weights import save_pretrained
from mirotrain.models.qwen3.builders import qwen3

TINY_ARGS: dict[str, Any] = dict(vocab_size=151936, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                 hidden_dim=192, max_seq_len=40960, tie_word_embeddings=True)


def write_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, **overrides: Any) -> str:
    """Write a tiny random Qwen3 (fp32) with the bundled Qwen3 tokenizer to ``out_dir``; returns the path."""
    from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir

    model = qwen3(**(TINY_ARGS | overrides))
    model.init_weights(seed=seed)
    path = save_pretrained(model, Path(out_dir), tokenizer_dir=bundled_tokenizer_dir(), dtype=torch.float32)
    return str(path)
