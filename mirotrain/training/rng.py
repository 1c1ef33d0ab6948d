"""Seeding and per-rank RNG state (python, numpy, torch CPU, CUDA) for bit-identical resume.

Without the saved RNG state anything random after a resume (dropout, random masking, data augmentation
added later) would diverge. The state is returned as plain Python/tensors so the checkpoint
code can store it without pickling.
"""

from __future__ import annotations

import random
import secrets
from typing import Any

import numpy as np
import torch


def draw_seed() -> int:
    """A fresh seed for ``seed: null`` (logged and stored in checkpoints by the trainer)."""
    return secrets.randbits(31)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
