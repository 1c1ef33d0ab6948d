"""The training loop shared by SFT and DPO: setup, the optimizer step, metrics, validation, checkpoints, resume.

    torchrun --nproc_per_node 8 -m mirotrain sft --config mirotrain/configs/qwen3/8B_full_sft.yaml
    mirotrain sft --config mirotrain/configs/tiny/sft.yaml          # one process (CPU, gloo)

One optimizer step (:meth:`Trainer.train_step`):
  1. take ``gradient_accumulation_steps`` micro-batches; count their trained tokens on the host (CPU batches)
     and all-reduce the count once — N, the trained tokens of the whole step over every rank;
  2. per micro-batch: forward, ``loss_sum · F / N`` backward (F = the factor FSDP divides gradients by), so the
     reduced gradient is exactly ∂(Σ token losses / N)/∂θ whatever the DP size, SP size or accumulation;
  3. clip by the true global L2 norm, optimizer step, LR step.
Nothing in a step reads a device value on the host; the only syncs are at logging steps (one ``tolist``).

Subclasses change the loss step only: :meth:`build_loss`, :meth:`count_targets`, :meth:`forward_backward`
(and optionally :meth:`extra_metrics`, :meth:`build_train_loader`). Everything else — meshes, FSDP, optimizer,
schedule, checkpoints and resume, metrics, HF export — is shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from mirotrain.checkpoint.step_checkpointer import StepCheckpointer
from mirotrain.config import instantiate
from mirotrain.data.batch import SFTBatch
from mirotrain.models.hf_writer import make_public_dirs
from mirotrain.parallel.fsdp import fsdp_modules
from mirotrain.training import builders
from mirotrain.training.forward import forward_hidden
from mirotrain.training.builders import DTYPES, cfg_value
from mirotrain.training.distributed import broadcast_object, init_distributed
from mirotrain.training.fault import fault_armed, fault_step, inject_fault
from mirotrain.training.grad_clip import clip_grad_norm_
from mirotrain.training.loss_curve import write_loss_curve
from mirotrain.training.metric_logging import JsonlLogger, StdoutLogger, TensorBoardLogger, format_metrics, \
    tensorboard_available
from mirotrain.training.metrics import matmul_params, peak_flops, peak_memory, reset_peak_memory, step_flops
from mirotrain.training.rng import draw_seed, seed_everything
from mirotrain.training.run_lock import RunLock
from mirotrain.training.state import TrainState, checkpoint_state, restore_state

log = logging.getLogger("mirotrain.train")

B = TypeVar("B", bound=SFTBatch)
# Config keys that do not change what is trained (excluded from the config hash checked on resume).
_HASH_EXCLUDED = {"output_dir", "log_every_n_steps", "log_peak_memory_stats", "log_level", "metric_logger",
                  "profiler", "enable_memory_trace", "memory_trace_start_step", "memory_trace_end_step",
                  "memory_trace_file_path", "checkpoint_steps_for_auto_resume", "keep_last_n_checkpoints",
                  "enable_async_checkpointing", "save_hf_every_epoch", "run_val_every_n_steps"}


@dataclass
class StepResult:
    """What one optimizer step leaves for logging: device tensors (no sync) and host numbers."""

    loss_sum: torch.Tensor      # Σ token losses of this rank (fp32, device)
    n_targets: torch.Tensor     # trained tokens of the step over all ranks (device)
    grad_norm: torch.Tensor     # global L2 norm before clipping (device)
    tokens: int                 # tokens (incl. padding) this rank computed
    flops: float                # forward+backward FLOPs this rank computed
    lr: float


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of the training-relevant config (logging/checkpoint cadence excluded); stored in checkpoints."""
    relevant = {k: v for k, v in cfg.items() if k not in _HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at ``level``; other ranks only warnings (every rank's errors reach the console)."""
    root = logging.getLogger()
    if not any(getattr(h, "_mirotrain", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s][rank{rank}][%(levelname)s] %(message)s", "%H:%M:%S"))
        handler._mirotrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO) if rank == 0 else logging.WARNING)


class Trainer:
    """Full-parameter training of a Qwen3 model on FSDP2; SFT's loss step (see the module docstring).

    Args:
        cfg: the resolved config (``mirotrain.config.load_config``).
        train_loader / val_loader: optional loaders following the data contract (docs/contracts.md); by
            default they are built from ``dataset`` / ``dataset_val``.
    """

    recipe = "sft"

    def __init__(self, cfg: dict, *, train_loader: Any = None, val_loader: Any = None):
        self.cfg = cfg
        self.dist = init_distributed(cfg_value(cfg, "device"))
        setup_logging(self.dist.rank, cfg_value(cfg, "log_level"))
        self.device = self.dist.device
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        if not cfg.get("output_dir"):
            raise ValueError("config key 'output_dir' is required")
        self.output_dir = Path(cfg["output_dir"])
        make_public_dirs(self.output_dir)  # 0755: the HF exports inside must be reachable by other users
        self.run_lock = RunLock.acquire(self.output_dir, self.rank, self.world_size)
        self._check_config()
        self.dtype = DTYPES[cfg_value(cfg, "dtype")]
        self.ga = int(cfg_value(cfg, "gradient_accumulation_steps"))
        self.epochs = int(cfg_value(cfg, "epochs"))
        self._build_meshes()

        self.checkpointer: StepCheckpointer | None = None
        resume_dir = resume_meta = None
        if cfg_value(cfg, "auto_resume"):
            self.checkpointer = StepCheckpointer(
                self.output_dir / "checkpoints", keep_last_n=int(cfg_value(cfg, "keep_last_n_checkpoints")),
                async_save=bool(cfg_value(cfg, "enable_async_checkpointing")), device=self.device)
            resume_dir = self.checkpointer.find_latest()
            if resume_dir is None:
                log.info("No step-based checkpoint was found in %s; training from the start.", self.checkpointer.root)
            else:
                resume_meta = StepCheckpointer.read_meta(resume_dir.path)
        self.seed = self._resolve_seed(resume_meta)
        seed_everything(self.seed)
        if cfg_value(cfg, "cudnn_deterministic_mode"):
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.tokenizer = builders.build_tokenizer(cfg) if train_loader is None or val_loader is None else None
        self.hf_checkpointer = instantiate(cfg["checkpointer"]) if cfg.get("checkpointer") else None
        self.loss_fn = self.build_loss()
        self.model = self._build_model()
        self.optimizer = builders.build_optimizer(cfg, self.model, self.device, self.cpu_offload)
        self.train_loader = train_loader if train_loader is not None else self.build_train_loader("dataset")
        if val_loader is None and cfg.get("dataset_val"):
            val_loader = self.build_train_loader("dataset_val")
        self.val_loader = val_loader
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.epochs * self.steps_per_epoch
        self.lr_scheduler = builders.build_lr_scheduler(cfg, self.optimizer, self.total_steps)
        self.state = TrainState(seed=self.seed)
        if resume_dir is not None:
            self._restore(resume_dir, resume_meta)
        self._setup_metrics()

    # ------------------------------------------------------------------------------------------ setup

    def _check_config(self) -> None:
        from mirotrain.config.schema import KEYS
        from mirotrain.config.validation import raise_if_invalid

        raise_if_invalid(self.cfg, world_size=self.world_size, check_files=True)
        for key, spec in KEYS.items():
            if spec.note == "ignored" and key in self.cfg and self.cfg[key] not in (None, False, spec.default):
                log.warning("Config key '%s' is accepted for compatibility and ignored: %s", key, spec.doc)
        if self.recipe == "sft":
            for key in ("ref_checkpointer",):
                if self.cfg.get(key):
                    log.warning("Config key '%s' is a DPO setting; `mirotrain sft` ignores it.", key)
        if cfg_value(self.cfg, "enable_activation_offloading") and cfg_value(self.cfg, "device") != "cuda":
            log.warning("enable_activation_offloading needs CUDA; ignored on %s.", cfg_value(self.cfg, "device"))

    def _build_meshes(self) -> None:
        from mirotrain.parallel.mesh import ParallelDims

        cfg = self.cfg
        if int(cfg_value(cfg, "data_parallel_replicate_dim")) != 1:
            raise ValueError("data_parallel_replicate_dim > 1 (HSDP) is not supported; FSDP shards over all ranks "
                             "(set data_parallel_replicate_dim: 1)")
        sp = int(cfg_value(cfg, "ulysses_sequence_parallel_size"))
        ep = int(cfg_value(cfg, "moe_expert_parallel_size"))
        self.dims = ParallelDims(self.world_size, dp=-1, sp=sp, ep=ep)
        shard = int(cfg_value(cfg, "data_parallel_shard_dim"))
        if shard not in (-1, self.world_size):
            raise ValueError(f"data_parallel_shard_dim={shard}: FSDP shards over all {self.world_size} ranks "
                             f"(data parallel × sequence parallel); set it to -1")
        self.meshes = self.dims.build_mesh(self.device.type)
        self.dp_rank, self.dp_size = self.meshes.dp_rank, self.meshes.dp_size
        self.sp_rank, self.sp_size = self.meshes.sp_rank, self.meshes.sp_size
        # FSDP averages reduced gradients over every rank of its mesh (dp × sp).
        self.grad_divide_factor = float(self.meshes.fsdp.size())
        self.loss_group = self.meshes.fsdp_group

    def _resolve_seed(self, resume_meta: dict | None) -> int:
        configured = self.cfg.get("seed")
        if resume_meta is not None:
            seed = int(resume_meta["seed"])
            if configured is not None and int(configured) != seed:
                log.warning("seed %s in the config differs from the checkpoint's seed %s; resuming with %s so the "
                            "data order continues unchanged.", configured, seed, seed)
            return seed
        if configured is not None:
            return int(configured)
        seed = broadcast_object(draw_seed() if self.rank == 0 else None)
        log.info("seed: null -> drew seed %d (stored in step checkpoints for resume)", seed)
        return int(seed)

    @property
    def cpu_offload(self) -> bool:
        return bool(cfg_value(self.cfg, "fsdp_cpu_offload"))

    def _compile_flags(self) -> tuple[bool, bool]:
        value = cfg_value(self.cfg, "compile")
        if value is None:
            value = self.device.type == "cuda"
        if isinstance(value, dict):
            unknown = set(value) - {"model", "loss", "optimizer_step", "scale_grads"}
            if unknown:
                raise ValueError(f"compile: unknown keys {sorted(unknown)} (model, loss, optimizer_step, scale_grads)")
            return bool(value.get("model", False)), bool(value.get("loss", False))
        return bool(value), bool(value)

    def _build_model(self) -> nn.Module:
        from mirotrain.models.families import family_of
        from mirotrain.parallel.activation_checkpoint import resolve_ac
        from mirotrain.parallel.options import ParallelizeOptions

        cfg = self.cfg
        model = builders.build_meta_model(cfg)
        hf_config = self.hf_checkpointer.hf_config() if self.hf_checkpointer is not None else None
        builders.check_against_checkpoint(model, hf_config)
        args = model.args
        self.dims.validate_model(args.n_heads, args.n_kv_heads, args.attention_backend, self.device.type)
        ac_mode, ac_option = resolve_ac(bool(cfg_value(cfg, "enable_activation_checkpointing")),
                                        cfg_value(cfg, "ac_mode"), cfg_value(cfg, "ac_option"))
        compile_model, compile_loss = self._compile_flags()
        if compile_loss and hasattr(self.loss_fn, "apply_compile"):
            self.loss_fn.apply_compile()
        family_of(args).parallelize(model, self.meshes, ParallelizeOptions(
            device_type=self.device.type, ac_mode=ac_mode, ac_option=ac_option, compile=compile_model,
            param_dtype=self.dtype, cpu_offload=self.cpu_offload,
            reshard_after_forward=bool(cfg_value(cfg, "fsdp_reshard_after_forward"))))
        builders.materialize(model, self.device, self.cpu_offload)
        if hf_config is not None:
            self.hf_checkpointer.load_into(model)
            log.info("Loaded base weights from %s", self.hf_checkpointer.checkpoint_dir)
        else:
            builders.init_random(model, self.seed)
            log.info("checkpointer.checkpoint_dir is not set: random initialisation (seed %d)", self.seed)
        self.n_matmul = matmul_params(args)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("Model: %.3fB parameters, %d layers; AC=%s%s, compile=%s, dtype=%s, world=%d (dp=%d, sp=%d, ep=%d)",
                 n_params / 1e9, args.n_layers, ac_mode, f"({ac_option})" if ac_option else "", compile_model,
                 cfg_value(cfg, "dtype"), self.world_size, self.dp_size, self.sp_size, self.dims.ep)
        return model

    def build_loss(self) -> nn.Module:
        """The loss module (SFT: chunked linear CE by default)."""
        loss = builders.build_loss(self.cfg)
        chunk = self.cfg.get("unembed_chunk_size")
        if chunk and hasattr(loss, "chunk_tokens"):
            loss.chunk_tokens = int(chunk)
        return loss

    def build_train_loader(self, section: str) -> Any:
        cfg = self.cfg
        if section == "dataset_val" and cfg.get("batch_size_val"):
            cfg = {**cfg, "batch_size": cfg["batch_size_val"]}
        return builders.build_loader(cfg, section, dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.seed,
                                     tokenizer=self.tokenizer)

    def _steps_per_epoch(self) -> int:
        micro = int(self.train_loader.steps_per_epoch)
        steps = micro // self.ga
        if steps < 1:
            raise ValueError(f"the dataset gives {micro} micro-batches per rank per epoch, fewer than "
                             f"gradient_accumulation_steps={self.ga}: nothing to train")
        if micro % self.ga:
            log.warning("%d micro-batches per epoch is not a multiple of gradient_accumulation_steps=%d; the last "
                        "%d of each epoch are not used.", micro, self.ga, micro % self.ga)
        cap = cfg_value(self.cfg, "max_steps_per_epoch")
        return min(steps, int(cap)) if cap else steps

    def _restore(self, resume_dir: Any, meta: dict) -> None:
        same_layout = meta.get("world_size") == self.world_size and meta.get("dp_size") == self.dp_size
        if not same_layout:
            log.warning("Resuming %s written with world_size=%s dp=%s on world_size=%d dp=%d: model and optimizer "
                        "are resharded; the data of epoch %s restarts from its beginning under the new sharding.",
                        resume_dir.path, meta.get("world_size"), meta.get("dp_size"), self.world_size, self.dp_size,
                        meta.get("epoch"))
        if meta.get("config_hash") != config_hash(self.cfg):
            log.warning("The config differs from the one %s was written with (training-relevant keys changed); "
                        "resuming anyway.", resume_dir.path)
        self.train_loader.set_epoch(int(meta["epoch"]))
        self.state = restore_state(self.checkpointer, resume_dir.path, self.model, self.optimizer, self.lr_scheduler,
                                   self.train_loader, self.rank, self.device, same_world=same_layout)
        if not same_layout:
            self.state.step_in_epoch = 0
        self.load_recipe_state(self.state.extra)
        log.info("Resumed from %s: step %d, epoch %d (step %d of %d in the epoch), seed %d", resume_dir.path,
                 self.state.step, self.state.epoch, self.state.step_in_epoch, self.steps_per_epoch, self.state.seed)

    # ------------------------------------------------------------------------------ recipe hooks

    def recipe_state(self) -> dict[str, Any]:
        """JSON-able state of the recipe beyond model/optimizer/data (e.g. a loss's running statistics),
        stored in the step checkpoint's train state; the base recipe has none."""
        return {}

    def load_recipe_state(self, extra: Mapping[str, Any]) -> None:
        """Restore what ``recipe_state`` returned, from the resumed train state's ``extra``."""

    def metrics_dir(self) -> Path:
        """Where metrics.jsonl and TensorBoard events go."""
        return self.output_dir

    def _setup_metrics(self) -> None:
        self.is_main = self.rank == 0
        self.log_every = int(cfg_value(self.cfg, "log_every_n_steps"))
        self.peak = peak_flops(self.device, self.dtype, self.cfg.get("mfu_peak_tflops"))
        self.sinks: list[Any] = []
        self.jsonl = None
        if self.is_main:
            self.jsonl = JsonlLogger(self.metrics_dir() / "metrics.jsonl")
            self.jsonl.truncate_after(self.state.step)
            self.sinks.append(self.jsonl)
            node = cfg_value(self.cfg, "metric_logger")
            if node is not None:
                logger = instantiate(node)
                if not isinstance(logger, StdoutLogger):
                    self.sinks.append(logger)
            if tensorboard_available() and not any(isinstance(s, TensorBoardLogger) for s in self.sinks):
                self.sinks.append(TensorBoardLogger(str(self.metrics_dir() / "tensorboard"), purge_step=self.state.step + 1))
        self._fault = bool(broadcast_object(fault_armed() if self.rank == 0 else None))
        self._window: list[StepResult] = []
        self._window_start = time.perf_counter()
        self.last_val_loss: float | None = None
        self._last_val_step = -1

    # ------------------------------------------------------------------------------------- loss step

    def prepare_batch(self, batch: B) -> B:
        """SP shard (on the host), then inputs to the device; labels stay on the host (see the loss)."""
        if self.sp_size > 1:
            from mirotrain.parallel.ulysses import shard_batch_for_sp

            pad_id = getattr(self.tokenizer, "pad_id", 0) if self.tokenizer is not None else 0
            batch = batch.replace(**shard_batch_for_sp(batch.token_fields(), self.sp_rank, self.sp_size, pad_id))
        return batch.to(self.device)

    def count_targets(self, batch: SFTBatch) -> int:
        """Trained tokens of a prepared micro-batch (host arithmetic on the CPU labels)."""
        return batch.num_targets()

    def forward_hidden(self, batch: SFTBatch) -> torch.Tensor:
        with self._activation_offload():
            return forward_hidden(self.model, batch)

    def forward_backward(self, batch: SFTBatch, grad_scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns this rank's Σ token losses (detached).

        ``grad_scale`` = F / N (see the module docstring). A MoE model's router loss share is added as the
        MoE module documents (its shares over ranks sum to the global loss; per micro-batch mean over GA).
        """
        hidden = self.forward_hidden(batch)
        loss_sum, _ = self.loss_fn(hidden, self.model.lm_head_weight, batch.labels)
        loss = loss_sum * grad_scale
        aux = self.moe_aux_loss()
        if aux is not None:
            loss = loss + aux * (self.grad_divide_factor / self.ga)
        loss.backward()
        return loss_sum.detach()

    def moe_aux_loss(self) -> torch.Tensor | None:
        fn = getattr(self.model, "moe_aux_loss", None)
        return fn(self.loss_group) if fn is not None else None

    def _activation_offload(self) -> contextlib.AbstractContextManager:
        if cfg_value(self.cfg, "enable_activation_offloading") and self.device.type == "cuda":
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ step

    def train_step(self, micro_batches: list[SFTBatch]) -> StepResult:
        """One optimizer step over ``micro_batches`` (see the module docstring)."""
        flops = sum(step_flops(self.model.args, self.n_matmul, b) for b in micro_batches) / self.sp_size
        prepared = [self.prepare_batch(b) for b in micro_batches]
        tokens = sum(int(b.input_ids.numel()) for b in prepared)
        n_local = sum(self.count_targets(b) for b in prepared)
        n_targets = torch.tensor(n_local, dtype=torch.float64, device=self.device)
        dist.all_reduce(n_targets, group=self.loss_group)
        grad_scale = (self.grad_divide_factor / n_targets.clamp(min=1)).float()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in prepared:
            loss_sum += self.forward_backward(batch, grad_scale)
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg_value(self.cfg, "clip_grad_norm"))
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, n_targets, grad_norm, tokens, flops, lr)

    # ------------------------------------------------------------------------------------------ loop

    def _micro_batches(self, it: Iterator[SFTBatch]) -> list[SFTBatch]:
        batches = []
        for _ in range(self.ga):
            try:
                batches.append(next(it))
            except StopIteration:
                raise RuntimeError(f"the data loader ended after {len(batches)} micro-batches of step "
                                   f"{self.state.step_in_epoch + 1}, before the {self.steps_per_epoch} steps per "
                                   f"epoch it announced") from None
        return batches

    def train(self) -> dict[str, Any]:
        """Run all epochs; returns the summary (also written to ``output_dir/summary.json``, with the loss curve
        ``output_dir/loss_curve.png`` beside it).

        A run resumed from its last step checkpoint (a re-run of a finished run) trains nothing; it only
        finishes what follows the last step (end-of-epoch validation, the final HF export, the summary), which
        also completes a run that crashed after its last checkpoint.
        """
        from tqdm import tqdm

        start = time.perf_counter()
        start_step = self.state.step
        if start_step >= self.total_steps and self.is_main:
            log.info("%s already trained all %d steps (resumed from its last step checkpoint): nothing to train.",
                     self.output_dir, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.recipe, dynamic_ncols=True,
                   disable=True if not self.is_main else None)
        profiler = self._profiler()
        try:
            while self.state.epoch < self.epochs:
                self.train_loader.set_epoch(self.state.epoch)
                it = iter(self.train_loader)
                while self.state.step_in_epoch < self.steps_per_epoch:
                    result = self.train_step(self._micro_batches(it))
                    self.state.step += 1
                    self.state.step_in_epoch += 1
                    bar.update(1)
                    self._after_step(result, bar)
                    if profiler is not None:
                        profiler.step()
                self._end_epoch()
            hf_dir = self.export_hf("final")
        finally:
            bar.close()
            if profiler is not None:
                profiler.__exit__(None, None, None)
        summary = self._summary(hf_dir, time.perf_counter() - start, start_step)
        self.close()
        return summary

    def _after_step(self, result: StepResult, bar: Any) -> None:
        step = self.state.step
        self._window.append(result)
        last = self.state.epoch == self.epochs - 1 and self.state.step_in_epoch == self.steps_per_epoch
        if step % self.log_every == 0 or last:
            metrics = self._log_window(step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        val_every = cfg_value(self.cfg, "run_val_every_n_steps")
        if self.val_loader is not None and val_every and step % int(val_every) == 0:
            self._log_val(step)
        self._memory_trace(step)
        # the last step too: a re-run of a finished run resumes there and trains nothing, and a conversion of
        # the run directory (its newest complete step) exports the final weights
        if self.checkpointer is not None and (step % int(cfg_value(self.cfg, "checkpoint_steps_for_auto_resume")) == 0
                                              or last):
            self.save_checkpoint()
        elif self.checkpointer is not None and self.checkpointer.async_save and not self.checkpointer.prepared:
            # the optimizer state exists now: the async-save host buffers are allocated meanwhile, in the background
            self.checkpointer.prepare(self.checkpoint_state_dict())
        if self._fault and step == fault_step():
            log.warning("MIROTRAIN_FAULT_AFTER_STEP=%d: killing this process group (test fault injection)", step)
            inject_fault()

    def _log_window(self, step: int) -> dict[str, float]:
        window, self._window = self._window, []
        loss_sum = torch.stack([r.loss_sum for r in window]).sum().double()
        n_targets = torch.stack([r.n_targets for r in window]).sum()
        host = torch.tensor([sum(r.tokens for r in window), sum(r.flops for r in window)], dtype=torch.float64,
                            device=self.device)
        summed = torch.cat([loss_sum.view(1), host])
        dist.all_reduce(summed)
        values = torch.cat([summed, n_targets.view(1).double(), window[-1].grad_norm.double().view(1)]).tolist()  # host sync
        loss_total, tokens, flops, n_total, grad_norm = values
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        self._window_start = time.perf_counter()
        self.state.trained_tokens += int(n_total)
        self.state.total_tokens += int(tokens)
        metrics: dict[str, float] = {
            "loss": loss_total / max(n_total, 1.0),
            "lr": window[-1].lr,
            "grad_norm": grad_norm,
            "tokens_per_sec_per_gpu": tokens / elapsed / self.world_size,
            "trained_tokens_per_sec_per_gpu": n_total / elapsed / self.world_size,
            "epoch": self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch,
        }
        if self.peak:
            metrics["mfu"] = flops / elapsed / self.world_size / self.peak
        if cfg_value(self.cfg, "log_peak_memory_stats"):
            metrics.update(peak_memory(self.device))
            reset_peak_memory(self.device)
        metrics.update(self.extra_metrics())
        self.state.last_metrics = metrics
        if self.state.first_loss is None:
            self.state.first_loss = metrics["loss"]
        if self.is_main:
            if not math.isfinite(metrics["loss"]):
                log.warning("Step %d: loss is %s", step, metrics["loss"])
            log.info(format_metrics(metrics, step))
            for sink in self.sinks:
                sink.log_dict(metrics, step)
        return metrics

    def extra_metrics(self) -> dict[str, float]:
        """Recipe-specific metrics at logging steps (collective calls allowed: every rank runs this)."""
        stats = getattr(self.model, "expert_load_stats", None)
        if stats is None:
            return {}
        return {k: v for k, v in stats(self.loss_group).items() if "/layer_" not in k}

    # -------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> float:
        """Token-level mean loss over the whole validation set (all ranks)."""
        loader = self.val_loader
        loader.set_epoch(0)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        it = iter(loader)
        for _ in range(int(loader.steps_per_epoch)):
            batch = self.prepare_batch(next(it))
            hidden = self.forward_hidden(batch)
            loss_sum, count = self.loss_fn(hidden, self.model.lm_head_weight, batch.labels)
            totals += torch.stack([loss_sum.double(), count.double()])
        dist.all_reduce(totals, group=self.loss_group)
        for module in fsdp_modules(self.model):
            module.reshard()  # without a backward the root would stay gathered
        loss_total, n = totals.tolist()
        return loss_total / max(n, 1.0)

    def _log_val(self, step: int) -> None:
        self._last_val_step = step
        self.last_val_loss = self.validate()
        if self.is_main:
            log.info("Step %d: val_loss=%.8g", step, self.last_val_loss)
            for sink in self.sinks:
                sink.log_dict({"val_loss": self.last_val_loss}, step)

    # -------------------------------------------------------------------------- checkpoints, export

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "step": self.state.step, "epoch": self.state.epoch,
                "step_in_epoch": self.state.step_in_epoch, "seed": self.state.seed,
                "config_hash": config_hash(self.cfg), "world_size": self.world_size, "dp_size": self.dp_size,
                "sp_size": self.sp_size, "dtype": cfg_value(self.cfg, "dtype"),
                "model_args": self.model.args.to_dict(), "tokenizer_dir": builders.tokenizer_dir(self.cfg),
                "config": self.cfg, "time": time.time()}

    def save_checkpoint(self) -> None:
        """Step checkpoint of the full training state (asynchronous unless configured otherwise)."""
        state = self.checkpoint_state_dict()
        if self.is_main:
            log.info("Starting to save a step-based checkpoint for epoch_%d step_%d", self.state.epoch, self.state.step)
        self.checkpointer.save(self.state.step, state, self.checkpoint_meta())

    def checkpoint_state_dict(self) -> dict[str, Any]:
        self.state.extra.update(self.recipe_state())
        return checkpoint_state(self.model, self.optimizer, self.lr_scheduler, self.train_loader, self.state,
                                self.rank, self.device)

    def _end_epoch(self) -> None:
        epoch = self.state.epoch
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        if self.val_loader is not None and self._last_val_step != self.state.step:
            self._log_val(self.state.step)
        if cfg_value(self.cfg, "save_hf_every_epoch") and self.state.epoch < self.epochs:
            self.export_hf(f"epoch_{epoch}")

    def export_hf(self, name: str) -> Path:
        """HF safetensors + config + tokenizer files at ``output_dir/hf/{name}`` (all ranks must call)."""
        from mirotrain.models.hf_weights import save_pretrained

        if self.checkpointer is not None:
            self.checkpointer.wait()  # do not overlap the gather with a background write
        out = self.output_dir / "hf" / name
        max_shard = getattr(self.hf_checkpointer, "max_shard_size", "5GB")
        save_pretrained(self.model, out, tokenizer_dir=builders.tokenizer_dir(self.cfg), max_shard_size=max_shard,
                        dtype=self.dtype)
        if self.is_main:
            log.info("Saved HF weights to %s", out)
            if name == "final" and cfg_value(self.cfg, "save_hf_every_epoch") and self.epochs > 0:
                _link_tree(out, self.output_dir / "hf" / f"epoch_{self.epochs - 1}")
        dist.barrier()
        return out

    def _summary(self, hf_dir: Path, wall: float, start_step: int) -> dict[str, Any]:
        """The run's summary; rank 0 also draws the loss curve and writes both into the output_dir.

        The losses and counters are the whole run's, not this process's: ``first_loss`` and the last logged
        metrics travel in every step checkpoint's train state, so a resumed run, even one that trained 0 steps
        (a re-run of a finished run), carries the previous values forward instead of writing nulls.
        ``steps_trained`` and ``wall_time_s`` are this process's; ``resumed_from_step`` says where it started.
        """
        png = write_loss_curve(self.metrics_dir(), f"{self.recipe}: training loss") if self.is_main else None
        summary = {"recipe": self.recipe, "steps": self.state.step, "steps_trained": self.state.step - start_step,
                   "resumed_from_step": start_step or None, "epochs": self.epochs,
                   "first_loss": self.state.first_loss, "final_loss": self.state.last_metrics.get("loss"),
                   "val_loss": self.last_val_loss, "hf_dir": str(hf_dir), "output_dir": str(self.output_dir),
                   "loss_curve_png": str(png) if png else None, "seed": self.seed,
                   "trained_tokens": self.state.trained_tokens, "total_tokens": self.state.total_tokens,
                   "world_size": self.world_size, "wall_time_s": wall, "last_metrics": self.state.last_metrics}
        if self.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    def close(self) -> None:
        """Finish the pending checkpoint, close the metric sinks, then free the output_dir for the next run."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
            for sink in getattr(self, "sinks", []):
                sink.close()
        finally:
            self.run_lock.release()

    # --------------------------------------------------------------------------------- profiling

    def _profiler(self) -> Any:
        node = cfg_value(self.cfg, "profiler") or {}
        if not node.get("enabled", False):
            return None
        out = node.get("output_dir") or str(self.output_dir / "profile")
        schedule = torch.profiler.schedule(wait=int(node.get("wait_steps", node.get("wait", 5))),
                                           warmup=int(node.get("warmup_steps", node.get("warmup", 3))),
                                           active=int(node.get("active_steps", node.get("active", 2))), repeat=1)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities, schedule=schedule,
                                      on_trace_ready=torch.profiler.tensorboard_trace_handler(f"{out}/rank{self.rank}"),
                                      record_shapes=bool(node.get("record_shapes", False)),
                                      profile_memory=bool(node.get("profile_memory", False)),
                                      with_stack=bool(node.get("with_stack", False)))
        prof.__enter__()
        return prof

    def _memory_trace(self, step: int) -> None:
        if not cfg_value(self.cfg, "enable_memory_trace") or self.device.type != "cuda":
            return
        start = int(cfg_value(self.cfg, "memory_trace_start_step"))
        end = cfg_value(self.cfg, "memory_trace_end_step") or start + 1
        if step == start:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        elif step == int(end):
            path = cfg_value(self.cfg, "memory_trace_file_path") or str(self.output_dir / "memory_snapshot.pickle")
            path = path.replace(".pickle", f"_rank{self.rank}.pickle")
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("CUDA memory snapshot written to %s", path)


def _link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` by hard links (no extra disk), falling back to copies."""
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    make_public_dirs(dst)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
