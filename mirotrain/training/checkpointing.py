"""Step checkpoints of a run: what their meta.json says, and resuming from one.

The tensors and train state a step checkpoint holds are :mod:`mirotrain.training.state`'s; writing, retention
and finding the newest complete one are :class:`~mirotrain.checkpoint.step_checkpointer.StepCheckpointer`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from mirotrain.checkpoint.step_checkpointer import StepCheckpointer
from mirotrain.training.layout import Layout
from mirotrain.training.state import TrainState, restore_state

log = logging.getLogger("mirotrain.train")

# Config keys that do not change what is trained (excluded from the config hash checked on resume).
_HASH_EXCLUDED = {"output_dir", "log_every_n_steps", "log_peak_memory_stats", "log_level", "metric_logger",
                  "profiler", "enable_memory_trace", "memory_trace_start_step", "memory_trace_end_step",
                  "memory_trace_file_path", "checkpoint_steps_for_auto_resume", "keep_last_n_checkpoints",
                  "enable_async_checkpointing", "save_hf_every_epoch", "run_val_every_n_steps"}


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of the training-relevant flat config (logging/checkpoint cadence excluded); stored in checkpoints."""
    relevant = {k: v for k, v in cfg.items() if k not in _HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ResumePoint:
    """The newest complete step checkpoint of the run and its meta.json."""

    path: Path
    meta: dict


@dataclass(frozen=True)
class RunRecord:
    """What every step checkpoint's meta.json says about the run (read back on resume and by `mirotrain convert`)."""

    recipe: str
    config: dict  # the flat config
    dtype: str
    model_args: dict
    tokenizer_dir: str | None
    layout: Layout

    def meta(self, state: TrainState) -> dict[str, Any]:
        return {"recipe": self.recipe, "step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                "seed": state.seed, "config_hash": config_hash(self.config), "world_size": self.layout.world_size,
                "dp_size": self.layout.dp_size, "sp_size": self.layout.sp_size, "dtype": self.dtype,
                "model_args": self.model_args, "tokenizer_dir": self.tokenizer_dir, "config": self.config,
                "time": time.time()}


def resume(point: ResumePoint, checkpointer: StepCheckpointer, record: RunRecord, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, lr_scheduler: Any, loader: Any, steps_per_epoch: int) -> TrainState:
    """Load ``point`` into the live objects and return its train state.

    On another layout (world or data-parallel size) model and optimizer are resharded and the data of the
    interrupted epoch restarts from its beginning under the new sharding.
    """
    meta, layout = point.meta, record.layout
    same_layout = meta.get("world_size") == layout.world_size and meta.get("dp_size") == layout.dp_size
    if not same_layout:
        log.warning("Resuming %s written with world_size=%s dp=%s on world_size=%d dp=%d: model and optimizer "
                    "are resharded; the data of epoch %s restarts from its beginning under the new sharding.",
                    point.path, meta.get("world_size"), meta.get("dp_size"), layout.world_size, layout.dp_size,
                    meta.get("epoch"))
    if meta.get("config_hash") != config_hash(record.config):
        log.warning("The config differs from the one %s was written with (training-relevant keys changed); "
                    "resuming anyway.", point.path)
    loader.set_epoch(int(meta["epoch"]))
    state = restore_state(checkpointer, point.path, model, optimizer, lr_scheduler, loader, layout.rank,
                          layout.device, same_world=same_layout)
    if not same_layout:
        state.step_in_epoch = 0
    log.info("Resumed from %s: step %d, epoch %d (step %d of %d in the epoch), seed %d", point.path, state.step,
             state.epoch, state.step_in_epoch, steps_per_epoch, state.seed)
    return state
