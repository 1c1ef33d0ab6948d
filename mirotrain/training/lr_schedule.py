"""Cosine learning-rate schedule with linear warm-up, as MiroTrain configs name it.

λ(t) = t / max(1, W)                                   for t < W,   W = int(warmup_ratio × total)
λ(t) = m + (1 − m) · max(0, ½(1 + cos(2π · c · p)))    otherwise,   p = min(1, (t − W) / max(1, total − W))

with c = ``num_cycles`` and m = ``min_lr_ratio``. p is clamped at 1, so the
rate never rises again when a run goes past the planned total (streaming step estimates), and a floor m can
be set. The scheduler state (``last_epoch``) is saved in step checkpoints, so resume does not re-derive it.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup_factor(step: int, num_training_steps: int, warmup_ratio: float = 0.1,
                              num_cycles: float = 0.5, min_lr_ratio: float = 0.0) -> float:
    """The multiplier λ(step) of the base learning rate (see module docstring)."""
    warmup = int(warmup_ratio * num_training_steps)
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
    cosine = max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def get_cosine_schedule_with_warmup(optimizer: Optimizer, num_training_steps: int, warmup_ratio: float = 0.1,
                                    num_cycles: float = 0.5, min_lr_ratio: float = 0.0,
                                    last_epoch: int = -1) -> LambdaLR:
    """LambdaLR over :func:`cosine_with_warmup_factor`; stepped once per optimizer step.

    ``num_training_steps`` is injected by the trainer (epochs × optimizer steps per epoch).
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return cosine_with_warmup_factor(step, num_training_steps, warmup_ratio, num_cycles, min_lr_ratio)

    return LambdaLR(optimizer, factor, last_epoch)
