"""The run's metrics, in one place: what a logging window sums, the rates and MFU derived from it, peak memory,
and where they go (the log line, ``metrics.jsonl``, TensorBoard, a configured ``metric_logger``, the progress bar,
``summary.json`` and the loss curve).

Each logged step reports, over the steps since the last logged one and every rank:

* ``loss`` — the objective's mean (per trained token for SFT, per pair for DPO); ``lr``; ``grad_norm`` (before
  clipping, of the window's last step);
* ``tokens_per_sec_per_gpu`` — tokens computed, padding included; ``trained_tokens_per_sec_per_gpu`` — tokens
  with a label (the ones the loss is taken over), for every recipe; an objective that normalises over something
  else also gets its own rate (DPO: ``pairs_per_sec_per_gpu``);
* ``epoch`` (fractional), ``mfu`` (where the peak is known), peak memory, then the objective's own metrics.

Nothing here reads a device value on the host except at logging steps (one ``tolist`` per window).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mirotrain.config import instantiate
from mirotrain.config.schema import MetricsConfig
from mirotrain.data.batch import SFTBatch
from mirotrain.training.layout import Layout
from mirotrain.training.loss_curve import write_loss_curve
from mirotrain.training.metric_logging import (JsonlLogger, StdoutLogger, TensorBoardLogger, format_metrics,
                                               tensorboard_available)
from mirotrain.training.metrics import matmul_params, peak_flops, peak_memory, reset_peak_memory, step_flops

log = logging.getLogger("mirotrain.train")


@dataclass
class StepResult:
    """What one optimizer step leaves for logging: device tensors (no sync) and host numbers."""

    loss_sum: torch.Tensor      # Σ losses of this rank (fp32, device)
    n_targets: torch.Tensor     # targets of the step over all ranks, what the loss is normalised by (device)
    grad_norm: torch.Tensor     # global L2 norm before clipping (device)
    tokens: int                 # tokens (incl. padding) this rank computed
    flops: float                # forward+backward FLOPs this rank computed
    lr: float
    trained_tokens: int         # tokens with a label this rank computed


@dataclass(frozen=True)
class Window:
    """One logged window: its metrics and the token counts (all ranks) it adds to the run's totals."""

    metrics: dict[str, float]
    trained_tokens: int
    total_tokens: int


def expert_load_stats(model: nn.Module, group: dist.ProcessGroup) -> dict[str, float]:
    """A MoE model's router load statistics over ``group`` (collective), without the per-layer ones."""
    stats = getattr(model, "expert_load_stats", None)
    if stats is None:
        return {}
    return {k: v for k, v in stats(group).items() if "/layer_" not in k}


class MetricsReporter:
    """Sums logging windows of :class:`StepResult` and writes their metrics (see the module docstring).

    Rank 0 writes; every rank takes part in the reductions. ``metrics.jsonl`` drops the lines of steps after
    ``start_step`` (a resumed run redoes them), so the file reads as one history.
    """

    def __init__(self, settings: MetricsConfig, layout: Layout, model_args: Any, dtype: torch.dtype,
                 metrics_dir: Path, start_step: int, target_unit: str):
        self.settings, self.layout, self.model_args, self.target_unit = settings, layout, model_args, target_unit
        self.metrics_dir = metrics_dir
        self.n_matmul = matmul_params(model_args)
        self.peak = peak_flops(layout.device, dtype, settings.mfu_peak_tflops)
        self.sinks: list[Any] = []
        if layout.is_main:
            jsonl = JsonlLogger(metrics_dir / "metrics.jsonl")
            jsonl.truncate_after(start_step)
            self.sinks.append(jsonl)
            if settings.metric_logger is not None:
                logger = instantiate(settings.metric_logger)
                if not isinstance(logger, StdoutLogger):  # the log line already goes to stdout
                    self.sinks.append(logger)
            if tensorboard_available() and not any(isinstance(s, TensorBoardLogger) for s in self.sinks):
                self.sinks.append(TensorBoardLogger(str(metrics_dir / "tensorboard"), purge_step=start_step + 1))
        self._window: list[StepResult] = []
        self._window_start = time.perf_counter()
        self._bar: Any = None

    def flops(self, micro_batches: list[SFTBatch]) -> float:
        """Forward+backward FLOPs this rank computes for ``micro_batches`` (host arithmetic on CPU batches)."""
        return sum(step_flops(self.model_args, self.n_matmul, b) for b in micro_batches) / self.layout.sp_size

    @contextlib.contextmanager
    def progress(self, total: int, done: int, desc: str) -> Iterator[None]:
        """A progress bar on rank 0 while the loop runs."""
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True,
                         disable=True if not self.layout.is_main else None)
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def add(self, result: StepResult) -> None:
        """One more optimizer step in the window."""
        self._window.append(result)
        if self._bar is not None:
            self._bar.update(1)

    def due(self, step: int) -> bool:
        return step % self.settings.log_every_n_steps == 0

    def log_window(self, step: int, epoch: float, extra: Mapping[str, float]) -> Window:
        """Reduce the window over all ranks (one host sync), derive its metrics, write them; all ranks call.

        ``extra``: the objective's and the model's own metrics of the window, appended as they are."""
        window, self._window = self._window, []
        world = self.layout.world_size
        loss_sum = torch.stack([r.loss_sum for r in window]).sum().double()
        n_targets = torch.stack([r.n_targets for r in window]).sum()
        host = torch.tensor([sum(r.tokens for r in window), sum(r.flops for r in window),
                             sum(r.trained_tokens for r in window)], dtype=torch.float64, device=self.layout.device)
        summed = torch.cat([loss_sum.view(1), host])
        dist.all_reduce(summed)
        values = torch.cat([summed, n_targets.view(1).double(), window[-1].grad_norm.double().view(1)]).tolist()
        loss_total, tokens, flops, trained, n_total, grad_norm = values
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        self._window_start = time.perf_counter()
        rates = {"trained_tokens": trained, self.target_unit: n_total}
        metrics: dict[str, float] = {"loss": loss_total / max(n_total, 1.0), "lr": window[-1].lr,
                                     "grad_norm": grad_norm, "tokens_per_sec_per_gpu": tokens / elapsed / world}
        metrics.update({f"{unit}_per_sec_per_gpu": count / elapsed / world for unit, count in rates.items()})
        metrics["epoch"] = epoch
        if self.peak:
            metrics["mfu"] = flops / elapsed / world / self.peak
        if self.settings.log_peak_memory_stats:
            metrics.update(peak_memory(self.layout.device))
            reset_peak_memory(self.layout.device)
        metrics.update(extra)
        if self.layout.is_main:
            if not math.isfinite(metrics["loss"]):
                log.warning("Step %d: loss is %s", step, metrics["loss"])
            log.info(format_metrics(metrics, step))
            for sink in self.sinks:
                sink.log_dict(metrics, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        return Window(metrics, int(trained), int(tokens))

    def log_val(self, step: int, val_loss: float) -> None:
        if self.layout.is_main:
            log.info("Step %d: val_loss=%.8g", step, val_loss)
            for sink in self.sinks:
                sink.log_dict({"val_loss": val_loss}, step)

    def loss_curve(self, recipe: str) -> Path | None:
        """``loss_curve.png`` beside metrics.jsonl (rank 0; None elsewhere or without matplotlib)."""
        return write_loss_curve(self.metrics_dir, f"{recipe}: training loss") if self.layout.is_main else None

    def write_summary(self, summary: dict[str, Any], output_dir: Path) -> None:
        if self.layout.is_main:
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
