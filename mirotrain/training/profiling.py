"""Optional diagnostics of a run: the torch.profiler window of the ``profiler`` section
(:mod:`mirotrain.training.torch_profiler`) and a CUDA memory snapshot (``enable_memory_trace``). Both are off by
default and cost nothing then."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mirotrain.config.schema import MetricsConfig
from mirotrain.training.torch_profiler import profiler_from_node

log = logging.getLogger("mirotrain.train")


class Diagnostics:
    """Enter before the first step, call :meth:`after_step` after each, exit at the end (also on failure)."""

    def __init__(self, metrics: MetricsConfig, output_dir: Path, rank: int, device: torch.device):
        self.metrics, self.output_dir, self.rank, self.device = metrics, output_dir, rank, device
        self.profiler = profiler_from_node(metrics.profiler, rank=rank, device=device, run_output_dir=str(output_dir))

    def __enter__(self) -> "Diagnostics":
        self.profiler.__enter__()
        return self

    def after_step(self, step: int) -> None:
        self._memory_trace(step)
        self.profiler.step()

    def __exit__(self, *exc: Any) -> None:
        self.profiler.__exit__(*exc)

    def _memory_trace(self, step: int) -> None:
        m = self.metrics
        if not m.enable_memory_trace or self.device.type != "cuda":
            return
        end = m.memory_trace_end_step or m.memory_trace_start_step + 1
        if step == m.memory_trace_start_step:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        elif step == int(end):
            path = m.memory_trace_file_path or str(self.output_dir / "memory_snapshot.pickle")
            path = path.replace(".pickle", f"_rank{self.rank}.pickle")
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("CUDA memory snapshot written to %s", path)
