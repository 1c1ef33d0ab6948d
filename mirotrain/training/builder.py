"""Wire a run from its typed config: process group, run lock, meshes, resume point and seed, then the model,
loaders, optimizer, schedule, step checkpoints and exports. The trainer gets the finished parts
(:class:`RunParts`) and reads no config. A recipe runs the steps in order and adds its objective:

    cfg = as_config(cfg)                                # a raw dict is checked like a config file
    env = start_run(cfg, tokenizer=True)                # process group, run lock, meshes, resume point, seed
    model = build_policy(env, loss)                     # sharded, with its base weights
    train, val = build_loaders(cfg, env, None, None)    # this data-parallel rank's loaders
    parts = finish_run(cfg, env, "sft", model, train, val)   # optimizer, schedule, cadences, exports

DPO puts its reference stage between the loaders and the loop (``build_loaders(..., prepare=...)``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mirotrain.checkpoint.step_checkpointer import StepCheckpointer
from mirotrain.config import instantiate
from mirotrain.config.compat import master_weights_notice
from mirotrain.config.schema import FLAT_KEYS, MetricsConfig
from mirotrain.config.tree import TrainConfig, parse_config
from mirotrain.models.hf_writer import make_public_dirs
from mirotrain.training.builders import (ModelSpec, build_loader, build_lr_scheduler, build_model, build_optimizer,
                                         build_tokenizer, tokenizer_dir)
from mirotrain.training.checkpointing import ResumePoint, RunRecord
from mirotrain.training.determinism import enable_deterministic_mode
from mirotrain.training.distributed import broadcast_object, init_distributed
from mirotrain.training.export import HFExport
from mirotrain.training.forward import BatchPlacement
from mirotrain.training.layout import Layout
from mirotrain.training.rng import draw_seed, seed_everything
from mirotrain.training.run_lock import RunLock

log = logging.getLogger("mirotrain.train")


def as_config(cfg: TrainConfig | dict) -> TrainConfig:
    """The typed config; a raw dict (tests, benchmarks) is checked as `mirotrain sft` checks a file, with the
    launch's world size."""
    if isinstance(cfg, TrainConfig):
        return cfg
    return parse_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), check_files=True)


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at ``level``; other ranks only warnings (every rank's errors reach the console)."""
    root = logging.getLogger()
    if not any(getattr(h, "_mirotrain", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s][rank{rank}][%(levelname)s] %(message)s", "%H:%M:%S"))
        handler._mirotrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO) if rank == 0 else logging.WARNING)


@dataclass
class RunEnv:
    """What is decided before any part is built: this process's place, the run's seed and resume point."""

    layout: Layout
    output_dir: Path
    run_lock: RunLock
    seed: int
    model_spec: ModelSpec
    checkpointer: StepCheckpointer | None  # step checkpoints (auto_resume)
    resume: ResumePoint | None
    hf_checkpointer: Any  # the base weights (None: random init from the seed)
    tokenizer: Any
    place: BatchPlacement


@dataclass(frozen=True)
class LoopSettings:
    """How the loop steps: epochs of steps of micro-batches, clipping, the validation and checkpoint cadences."""

    epochs: int
    grad_accum: int
    steps_per_epoch: int
    clip_grad_norm: Any
    val_every: int | None
    checkpoint_every: int


@dataclass
class RunParts:
    """Everything the trainer needs, built and wired."""

    recipe: str
    env: RunEnv
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_loader: Any
    val_loader: Any
    loop: LoopSettings
    record: RunRecord  # what step checkpoints say about the run
    export: HFExport
    metrics: MetricsConfig


def start_run(cfg: TrainConfig, *, tokenizer: bool) -> RunEnv:
    """Join the process group, take the run lock, build the meshes, find the resume point and fix the seed;
    ``tokenizer``: build the tokenizer (the loaders are built from the config)."""
    from mirotrain.parallel.mesh import ParallelDims

    # before the process group and the first matmul: NCCL and cuBLAS read their settings when they start
    deterministic = enable_deterministic_mode() if cfg.run.cudnn_deterministic_mode else None
    info = init_distributed(cfg.run.device)
    setup_logging(info.rank, cfg.metrics.log_level)
    if deterministic:
        log.info(deterministic)
    output_dir = Path(cfg.run.output_dir)
    make_public_dirs(output_dir)  # 0755: the HF exports inside must be reachable by other users
    run_lock = RunLock.acquire(output_dir, info.rank, info.world_size)
    _warn_unused_keys(cfg)
    dims = ParallelDims(info.world_size, dp=-1, sp=cfg.parallel.ulysses_sequence_parallel_size,
                        ep=cfg.parallel.moe_expert_parallel_size)
    layout = Layout(info.device, info.rank, info.world_size, dims.build_mesh(info.device.type))
    checkpointer, resume = _resume_point(cfg, output_dir, info.device)
    seed = _resolve_seed(cfg.run.seed, resume, info.rank)
    seed_everything(seed)
    tok = build_tokenizer(cfg.tokenizer.component) if tokenizer else None
    hf_checkpointer = instantiate(cfg.checkpoint.checkpointer) if cfg.checkpoint.checkpointer else None
    place = BatchPlacement(info.device, layout.sp_rank, layout.sp_size, pad_id=getattr(tok, "pad_id", 0))
    spec = ModelSpec.from_config(cfg, info.device, info.world_size)
    return RunEnv(layout, output_dir, run_lock, seed, spec, checkpointer, resume, hf_checkpointer, tok, place)


def _warn_unused_keys(cfg: TrainConfig) -> None:
    for flat, (section, name, spec) in FLAT_KEYS.items():
        value = getattr(getattr(cfg, section), name)
        if spec.note == "ignored" and flat in cfg.written and value not in (None, False, spec.default):
            log.warning("Config key '%s' is accepted for compatibility and ignored: %s", flat, spec.doc)
    if cfg.model.fp8_recipe_name is not None and not cfg.model.enable_fp8_training:
        log.warning("Config key 'fp8_recipe_name' (%s) is read only with enable_fp8_training: True; ignored.",
                    cfg.model.fp8_recipe_name)
    notice = master_weights_notice(cfg.run.dtype, cfg.written)
    if notice:
        log.info(notice)
    if cfg.model.enable_activation_offloading and cfg.run.device != "cuda":
        log.warning("enable_activation_offloading needs CUDA; ignored on %s.", cfg.run.device)


def _resume_point(cfg: TrainConfig, output_dir: Path, device: torch.device
                  ) -> tuple[StepCheckpointer | None, ResumePoint | None]:
    if not cfg.checkpoint.auto_resume:
        return None, None
    checkpointer = StepCheckpointer(output_dir / "checkpoints", keep_last_n=cfg.checkpoint.keep_last_n_checkpoints,
                                    async_save=cfg.checkpoint.enable_async_checkpointing, device=device)
    latest = checkpointer.find_latest()
    if latest is None:
        log.info("No step-based checkpoint was found in %s; training from the start.", checkpointer.root)
        return checkpointer, None
    return checkpointer, ResumePoint(latest.path, StepCheckpointer.read_meta(latest.path))


def _resolve_seed(configured: int | None, resume: ResumePoint | None, rank: int) -> int:
    """The checkpoint's seed on resume (the data order continues), else the configured one, else a drawn one."""
    if resume is not None:
        seed = int(resume.meta["seed"])
        if configured is not None and configured != seed:
            log.warning("seed %s in the config differs from the checkpoint's seed %s; resuming with %s so the "
                        "data order continues unchanged.", configured, seed, seed)
        return seed
    if configured is not None:
        return configured
    seed = broadcast_object(draw_seed() if rank == 0 else None)
    log.info("seed: null -> drew seed %d (stored in step checkpoints for resume)", seed)
    return int(seed)


def build_policy(env: RunEnv, loss: nn.Module) -> nn.Module:
    """The trained model, with its base weights; the loss kernel is compiled alongside when configured."""
    if env.model_spec.compile_loss and hasattr(loss, "apply_compile"):
        loss.apply_compile()
    return build_model(env.model_spec, env.layout, env.hf_checkpointer, env.seed)


def build_loaders(cfg: TrainConfig, env: RunEnv, train_loader: Any, val_loader: Any,
                  prepare: Callable[[Any, str], Any] | None = None) -> tuple[Any, Any]:
    """The given loaders, else those of ``dataset`` and (if configured) ``dataset_val``, each passed through
    ``prepare(loader, section)`` when given."""
    def build(section: str) -> Any:
        loader = build_loader(cfg, section, env.layout, seed=env.seed, tokenizer=env.tokenizer)
        return prepare(loader, section) if prepare is not None else loader

    if train_loader is None:
        train_loader = build("dataset")
    if val_loader is None and cfg.data.dataset_val is not None:
        val_loader = build("dataset_val")
    return train_loader, val_loader


def finish_run(cfg: TrainConfig, env: RunEnv, recipe: str, model: nn.Module, train_loader: Any,
               val_loader: Any) -> RunParts:
    """The optimizer, the schedule over the run's steps, the loop's cadences, checkpoint meta and exports."""
    optim = cfg.optim
    optimizer = build_optimizer(optim.optimizer, model, cfg.run.master_weights, cfg.run.optimizer_state_offload,
                                env.model_spec.compile_optimizer)
    if env.model_spec.fp8_recipe is not None:
        from mirotrain.parallel.float8 import attach_scale_precompute

        attach_scale_precompute(optimizer, model)
    steps = _steps_per_epoch(int(train_loader.steps_per_epoch), optim.gradient_accumulation_steps,
                             optim.max_steps_per_epoch)
    lr_scheduler = build_lr_scheduler(optim.lr_scheduler, optimizer, optim.epochs * steps)
    loop = LoopSettings(epochs=optim.epochs, grad_accum=optim.gradient_accumulation_steps, steps_per_epoch=steps,
                        clip_grad_norm=optim.clip_grad_norm, val_every=cfg.data.run_val_every_n_steps,
                        checkpoint_every=cfg.checkpoint.checkpoint_steps_for_auto_resume)
    tok_dir = tokenizer_dir(cfg)
    record = RunRecord(recipe, cfg.to_dict(), cfg.run.dtype, model.args.to_dict(), tok_dir, env.layout)
    export = HFExport(env.output_dir, tok_dir, cfg.checkpoint.checkpoint_dir,
                      getattr(env.hf_checkpointer, "max_shard_size", "5GB"), env.model_spec.dtype,
                      cfg.checkpoint.save_hf_every_epoch, optim.epochs)
    return RunParts(recipe, env, model, optimizer, lr_scheduler, train_loader, val_loader, loop, record, export,
                    cfg.metrics)


def _steps_per_epoch(micro: int, grad_accum: int, cap: int | None) -> int:
    steps = micro // grad_accum
    if steps < 1:
        raise ValueError(f"the dataset gives {micro} micro-batches per rank per epoch, fewer than "
                         f"gradient_accumulation_steps={grad_accum}: nothing to train")
    if micro % grad_accum:
        log.warning("%d micro-batches per epoch is not a multiple of gradient_accumulation_steps=%d; the last "
                    "%d of each epoch are not used.", micro, grad_accum, micro % grad_accum)
    return min(steps, cap) if cap else steps
