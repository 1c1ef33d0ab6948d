"""The ``profiler`` section: torchtune's ``setup_torch_profiler`` keys, read as MiroTrain configs write them.

    profiler:
      _component_: torchtune.training.setup_torch_profiler   # the default when left out
      enabled: True
      output_dir: ${output_dir}/profiling_outputs
      wait_steps: 5      # per cycle: skip 5 optimizer steps,
      warmup_steps: 3    # trace 3 and discard them,
      active_steps: 2    # record 2;
      num_cycles: 1      # this many cycles (0: until training ends)

The component builds :class:`ProfilerSettings` (plain values, checked like every config key); the trainer turns
them into a :class:`StepProfiler` with :func:`profiler_from_node` and calls ``step()`` after each optimizer
step. At the end of each cycle every rank writes, as torchtune does,
``{output_dir}/iteration_{step}/rank{r}_trace.json`` (Chrome/Perfetto trace) and ``rank{r}_key_averages.txt``,
plus ``rank{r}_memory-timeline.html`` on CUDA with ``profile_memory``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("mirotrain.train")

DEFAULT_SUBDIR = "profiling_outputs"


@dataclass(frozen=True)
class ProfilerSettings:
    """One ``profiler`` section; the defaults are torchtune's (schedule 5 / 3 / 2, one cycle)."""

    enabled: bool = False
    cpu: bool = True
    cuda: bool = True
    xpu: bool = True
    profile_memory: bool = False
    with_stack: bool = False
    record_shapes: bool = True
    with_flops: bool = False
    wait_steps: int = 5
    warmup_steps: int = 3
    active_steps: int = 2
    num_cycles: int = 1
    output_dir: str | None = None

    def profiler(self, *, rank: int, device: torch.device, run_output_dir: str) -> "StepProfiler":
        """The profiler of one rank; traces go to ``output_dir`` (default ``{run_output_dir}/profiling_outputs``)."""
        return StepProfiler(self, rank=rank, device=device,
                            output_dir=self.output_dir or os.path.join(str(run_output_dir), DEFAULT_SUBDIR))


def setup_torch_profiler(enabled: bool = False, cpu: bool = True, cuda: bool = True, xpu: bool = True,
                         profile_memory: bool = False, with_stack: bool = False, record_shapes: bool = True,
                         with_flops: bool = False, wait_steps: int | None = None, warmup_steps: int | None = None,
                         active_steps: int | None = None, num_cycles: int | None = None,
                         output_dir: str | None = None) -> ProfilerSettings:
    """The settings a ``profiler`` section writes (torchtune's signature; null schedule keys take its defaults).

    ``profile_memory`` needs the stacks and shapes of each allocation for the memory timeline, so it turns
    ``with_stack`` and ``record_shapes`` on, as torchtune does.
    """
    defaults = ProfilerSettings()
    if profile_memory and not (with_stack and record_shapes):
        log.warning("profiler.profile_memory needs with_stack and record_shapes: both are turned on")
        with_stack = record_shapes = True
    return ProfilerSettings(
        enabled=enabled, cpu=cpu, cuda=cuda, xpu=xpu, profile_memory=profile_memory, with_stack=with_stack,
        record_shapes=record_shapes, with_flops=with_flops,
        wait_steps=defaults.wait_steps if wait_steps is None else wait_steps,
        warmup_steps=defaults.warmup_steps if warmup_steps is None else warmup_steps,
        active_steps=defaults.active_steps if active_steps is None else active_steps,
        num_cycles=defaults.num_cycles if num_cycles is None else num_cycles,
        output_dir=output_dir)


class StepProfiler:
    """``with profiler: ... profiler.step()`` once per optimizer step. Disabled, it records and writes nothing."""

    def __init__(self, settings: ProfilerSettings, *, rank: int, device: torch.device, output_dir: str):
        self.settings, self.rank, self.device, self.output_dir = settings, rank, device, output_dir
        self._profile: torch.profiler.profile | None = None

    def _activities(self) -> list[torch.profiler.ProfilerActivity]:
        s, kind = self.settings, self.device.type
        activities = [torch.profiler.ProfilerActivity.CPU] if s.cpu else []
        if s.cuda and kind == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if s.xpu and kind == "xpu":
            activities.append(torch.profiler.ProfilerActivity.XPU)
        if not activities:
            log.warning("profiler: no activity of this %s device is enabled; tracing the CPU", kind)
            activities = [torch.profiler.ProfilerActivity.CPU]
        return activities

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        """torchtune's trace handler: one directory per cycle, named after the step that closed it."""
        out = os.path.join(self.output_dir, f"iteration_{prof.step_num}")
        os.makedirs(out, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out, f"rank{self.rank}_trace.json"))
        with open(os.path.join(out, f"rank{self.rank}_key_averages.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=100))
        if self.settings.profile_memory and self.device.type == "cuda":
            prof.export_memory_timeline(os.path.join(out, f"rank{self.rank}_memory-timeline.html"),
                                        device=str(self.device))
        if self.rank == 0:
            log.info("profiler: trace of steps up to %d written to %s", prof.step_num, out)

    def __enter__(self) -> "StepProfiler":
        s = self.settings
        if s.enabled:
            os.makedirs(self.output_dir, exist_ok=True)
            schedule = torch.profiler.schedule(wait=s.wait_steps, warmup=s.warmup_steps, active=s.active_steps,
                                               repeat=s.num_cycles)
            self._profile = torch.profiler.profile(
                activities=self._activities(), schedule=schedule, on_trace_ready=self._write_trace,
                record_shapes=s.record_shapes, profile_memory=s.profile_memory, with_stack=s.with_stack,
                with_flops=s.with_flops)
            self._profile.__enter__()
        return self

    def step(self) -> None:
        if self._profile is not None:
            self._profile.step()

    def __exit__(self, *exc: Any) -> None:
        if self._profile is not None:
            self._profile.__exit__(*exc)
            self._profile = None


def profiler_from_node(node: dict | None, *, rank: int, device: torch.device, run_output_dir: str) -> StepProfiler:
    """What the trainer enters around its loop: the profiler of a config's ``profiler`` section (None: off)."""
    from mirotrain.config.registry import DEFAULT_COMPONENTS, instantiate

    settings = instantiate({"_component_": DEFAULT_COMPONENTS["profiler"], **(node or {})})
    return settings.profiler(rank=rank, device=device, run_output_dir=run_output_dir)


__all__ = ["ProfilerSettings", "StepProfiler", "profiler_from_node", "setup_torch_profiler"]
