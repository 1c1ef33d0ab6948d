"""The training loop shared by SFT and DPO: the loop, its state and the optimizer step.

    torchrun --nproc_per_node 8 -m mirotrain sft --config mirotrain/configs/qwen3/8B_full_sft.yaml
    mirotrain sft --config mirotrain/configs/tiny/sft.yaml          # one process (CPU, gloo)

The parts come built (:mod:`mirotrain.training.builder`); the recipe's loss step is its objective
(:mod:`mirotrain.training.objectives`); metrics go through :class:`~mirotrain.training.reporter.MetricsReporter`.

One optimizer step (:meth:`Trainer.train_step`):
  1. take ``gradient_accumulation_steps`` micro-batches; count their targets on the host (CPU batches) and
     all-reduce the count once — N, the targets (trained tokens, or DPO pairs) of the whole step over every rank;
  2. per micro-batch: forward, ``loss_sum · F / N`` backward (F = the factor FSDP divides gradients by), so the
     reduced gradient is exactly ∂(Σ losses / N)/∂θ whatever the DP size, SP size or accumulation;
  3. clip by the true global L2 norm, optimizer step, LR step.
Nothing in a step reads a device value on the host; the host syncs are marked ``# host sync`` (logging steps,
validation, checkpoints).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mirotrain.checkpoint.layout import epoch_dir_name
from mirotrain.data.batch import SFTBatch
from mirotrain.training.builder import RunParts
from mirotrain.training.checkpointing import resume
from mirotrain.training.fault import FaultHook
from mirotrain.training.forward import reshard
from mirotrain.training.grad_clip import clip_grad_norm_
from mirotrain.training.objectives import Objective
from mirotrain.training.profiling import Diagnostics
from mirotrain.training.reporter import MetricsReporter, StepResult, expert_load_stats
from mirotrain.training.state import TrainState, checkpoint_state

log = logging.getLogger("mirotrain.train")

__all__ = ["StepResult", "Trainer"]


class Trainer:
    """Full-parameter training of ``parts.model`` on FSDP2 with ``objective``'s loss step (module docstring)."""

    def __init__(self, parts: RunParts, objective: Objective):
        self.parts, self.objective, self.loop = parts, objective, parts.loop
        self.layout = parts.env.layout
        self.device, self.rank, self.world_size = self.layout.device, self.layout.rank, self.layout.world_size
        self.loss_group = self.layout.loss_group
        self.output_dir = parts.env.output_dir
        self.model, self.optimizer, self.lr_scheduler = parts.model, parts.optimizer, parts.lr_scheduler
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.checkpointer = parts.env.checkpointer
        self.steps_per_epoch = self.loop.steps_per_epoch
        self.total_steps = self.loop.epochs * self.steps_per_epoch
        self.state = TrainState(seed=parts.env.seed)
        if parts.env.resume is not None:
            self.state = resume(parts.env.resume, self.checkpointer, parts.record, self.model, self.optimizer,
                                self.lr_scheduler, self.train_loader, self.steps_per_epoch)
            objective.load_state_dict(self.state.extra)
        self.reporter = MetricsReporter(parts.metrics, self.layout, self.model.args, parts.export.dtype,
                                        self.output_dir, self.state.step, objective.target_unit)
        self.fault = FaultHook(self.rank)
        self.last_val_loss: float | None = None
        self._last_val_step = -1

    # ------------------------------------------------------------------------------------------ loop

    def train(self) -> dict[str, Any]:
        """Run all epochs; returns the summary (also written to ``output_dir/summary.json``, with the loss curve
        ``output_dir/loss_curve.png`` beside it).

        A run resumed from its last step checkpoint (a re-run of a finished run) trains nothing; it only
        finishes what follows the last step (end-of-epoch validation, the final HF export, the summary), which
        also completes a run that crashed after its last checkpoint.
        """
        start, start_step = time.perf_counter(), self.state.step
        if start_step >= self.total_steps and self.layout.is_main:
            log.info("%s already trained all %d steps (resumed from its last step checkpoint): nothing to train.",
                     self.output_dir, self.total_steps)
        with self.reporter.progress(self.total_steps, start_step, self.parts.recipe), \
                Diagnostics(self.parts.metrics, self.output_dir, self.rank, self.device) as diagnostics:
            while self.state.epoch < self.loop.epochs:
                self.train_loader.set_epoch(self.state.epoch)
                it = iter(self.train_loader)
                while self.state.step_in_epoch < self.steps_per_epoch:
                    result = self.train_step(self._micro_batches(it))
                    self.state.advance()
                    self._after_step(result)  # host sync at logging, validation and checkpoint steps
                    diagnostics.after_step(self.state.step)
                self._end_epoch()  # host sync (validation)
            hf_dir = self.export_hf("final")
        summary = self._summary(hf_dir, time.perf_counter() - start, start_step)
        self.close()
        return summary

    def train_step(self, micro_batches: list[SFTBatch]) -> StepResult:
        """One optimizer step over ``micro_batches`` (see the module docstring)."""
        flops = self.reporter.flops(micro_batches)
        prepared = [self.parts.env.place(b) for b in micro_batches]
        tokens = sum(int(b.input_ids.numel()) for b in prepared)
        trained_tokens = sum(b.num_targets() for b in prepared)
        n_local = sum(self.objective.count_targets(b) for b in prepared)
        n_targets = torch.tensor(n_local, dtype=torch.float64, device=self.device)
        dist.all_reduce(n_targets, group=self.loss_group)
        grad_scale = (self.layout.grad_divide_factor / n_targets.clamp(min=1)).float()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in prepared:
            loss_sum += self.objective.forward_backward(self.model, batch, grad_scale)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.loop.clip_grad_norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, n_targets, grad_norm, tokens, flops, lr, trained_tokens)

    def _micro_batches(self, it: Iterator[SFTBatch]) -> list[SFTBatch]:
        batches = []
        for _ in range(self.loop.grad_accum):
            try:
                batches.append(next(it))
            except StopIteration:
                raise RuntimeError(f"the data loader ended after {len(batches)} micro-batches of step "
                                   f"{self.state.step_in_epoch + 1}, before the {self.steps_per_epoch} steps per "
                                   f"epoch it announced") from None
        return batches

    def _after_step(self, result: StepResult) -> None:
        """Logging, validation and checkpoint cadences after optimizer step ``state.step``."""
        step = self.state.step
        last = self.state.epoch == self.loop.epochs - 1 and self.state.step_in_epoch == self.steps_per_epoch
        self.reporter.add(result)
        if self.reporter.due(step) or last:
            extra = {**expert_load_stats(self.model, self.loss_group), **self.objective.window_metrics()}
            epoch = self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch
            window = self.reporter.log_window(step, epoch, extra)  # host sync
            self.state.record(window.metrics, window.trained_tokens, window.total_tokens)
        if self.val_loader is not None and self.loop.val_every and step % self.loop.val_every == 0:
            self._log_val(step)  # host sync
        # the last step too: a re-run of a finished run resumes there and trains nothing, and a conversion of
        # the run directory (its newest complete step) exports the final weights
        saved_now = self.checkpointer is not None and (step % self.loop.checkpoint_every == 0 or last)
        if saved_now:
            self.save_checkpoint()  # host sync (staging)
        elif self.checkpointer is not None and self.checkpointer.async_save and not self.checkpointer.prepared:
            # the optimizer state exists now: the async-save host buffers are allocated meanwhile, in the background
            self.checkpointer.prepare(self.checkpoint_state_dict())
        self.fault.after_step(step, None if saved_now else self.checkpointer)

    def _end_epoch(self) -> None:
        epoch = self.state.epoch
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        if self.val_loader is not None and self._last_val_step != self.state.step:
            self._log_val(self.state.step)
        if self.parts.export.every_epoch and self.state.epoch < self.loop.epochs:
            self.export_hf(epoch_dir_name(epoch))

    # -------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> float:
        """The objective's mean loss over the whole validation set (all ranks)."""
        loader = self.val_loader
        loader.set_epoch(0)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        it = iter(loader)
        with self.objective.evaluating(self.model):
            for _ in range(int(loader.steps_per_epoch)):
                totals += self.objective.validation_sums(self.model, self.parts.env.place(next(it)))
        dist.all_reduce(totals, group=self.loss_group)
        reshard(self.model)
        loss_total, n = totals.tolist()  # host sync
        return loss_total / max(n, 1.0)

    def _log_val(self, step: int) -> None:
        self._last_val_step = step
        self.last_val_loss = self.validate()
        self.reporter.log_val(step, self.last_val_loss)

    # -------------------------------------------------------------------------- checkpoints, export

    def save_checkpoint(self) -> None:
        """Step checkpoint of the full training state (asynchronous unless configured otherwise)."""
        state = self.checkpoint_state_dict()
        if self.layout.is_main:
            log.info("Starting to save a step-based checkpoint for epoch_%d step_%d", self.state.epoch, self.state.step)
        self.checkpointer.save(self.state.step, state, self.parts.record.meta(self.state))

    def checkpoint_state_dict(self) -> dict[str, Any]:
        self.state.extra.update(self.objective.state_dict())
        return checkpoint_state(self.model, self.optimizer, self.lr_scheduler, self.train_loader, self.state,
                                self.rank, self.device)

    def export_hf(self, name: str) -> Path:
        """HF safetensors + config + tokenizer files at ``output_dir/hf/{name}`` (all ranks must call)."""
        if self.checkpointer is not None:
            self.checkpointer.wait()  # do not overlap the gather with a background write
        return self.parts.export.save(self.model, name, self.layout.is_main)

    def _summary(self, hf_dir: Path, wall: float, start_step: int) -> dict[str, Any]:
        """The run's summary; rank 0 also draws the loss curve and writes both into the output_dir.

        The losses and counters are the whole run's, not this process's: ``first_loss`` and the last logged
        metrics travel in every step checkpoint's train state, so a resumed run, even one that trained 0 steps
        (a re-run of a finished run), carries the previous values forward instead of writing nulls.
        ``steps_trained`` and ``wall_time_s`` are this process's; ``resumed_from_step`` says where it started.
        """
        s, png = self.state, self.reporter.loss_curve(self.parts.recipe)
        summary = {"recipe": self.parts.recipe, "steps": s.step, "steps_trained": s.step - start_step,
                   "resumed_from_step": start_step or None, "epochs": self.loop.epochs, "first_loss": s.first_loss,
                   "final_loss": s.last_metrics.get("loss"), "val_loss": self.last_val_loss, "hf_dir": str(hf_dir),
                   "output_dir": str(self.output_dir), "loss_curve_png": str(png) if png else None, "seed": s.seed,
                   "trained_tokens": s.trained_tokens, "total_tokens": s.total_tokens, "world_size": self.world_size,
                   "wall_time_s": wall, "last_metrics": s.last_metrics}
        self.reporter.write_summary(summary, self.output_dir)
        return summary

    def close(self) -> None:
        """Finish the pending checkpoint, close the metric sinks, then free the output_dir for the next run."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
            self.reporter.close()
        finally:
            self.parts.env.run_lock.release()
