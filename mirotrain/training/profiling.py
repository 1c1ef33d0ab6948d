"""Optional diagnostics of a run: a torch.profiler window (``profiler``) and a CUDA memory snapshot
(``enable_memory_trace``). Both are off by default and cost nothing then."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mirotrain.config.schema import MetricsConfig

log = logging.getLogger("mirotrain.train")


class Diagnostics:
    """Enter before the first step, call :meth:`after_step` after each, exit at the end (also on failure)."""

    def __init__(self, metrics: MetricsConfig, output_dir: Path, rank: int, device: torch.device):
        self.metrics, self.output_dir, self.rank, self.device = metrics, output_dir, rank, device
        self._profiler: Any = None

    def __enter__(self) -> "Diagnostics":
        node = self.metrics.profiler or {}
        if node.get("enabled", False):
            out = node.get("output_dir") or str(self.output_dir / "profile")
            schedule = torch.profiler.schedule(wait=int(node.get("wait_steps", node.get("wait", 5))),
                                               warmup=int(node.get("warmup_steps", node.get("warmup", 3))),
                                               active=int(node.get("active_steps", node.get("active", 2))), repeat=1)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            trace = torch.profiler.tensorboard_trace_handler(f"{out}/rank{self.rank}")
            self._profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=trace,
                                                    record_shapes=bool(node.get("record_shapes", False)),
                                                    profile_memory=bool(node.get("profile_memory", False)),
                                                    with_stack=bool(node.get("with_stack", False)))
            self._profiler.__enter__()
        return self

    def after_step(self, step: int) -> None:
        self._memory_trace(step)
        if self._profiler is not None:
            self._profiler.step()

    def __exit__(self, *exc: Any) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)

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
