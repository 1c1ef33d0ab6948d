"""Training: the loop shared by SFT and DPO (``trainer``), LR schedules, metrics and logging, clipping."""

from mirotrain.training.lr_schedule import get_cosine_schedule_with_warmup

__all__ = ["get_cosine_schedule_with_warmup"]
