"""Build one part of a run from its config section: a model (meta -> parallelised -> materialised -> weights),
the optimizer, the LR schedule, the tokenizer, a data loader. :mod:`mirotrain.training.builder` wires them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mirotrain.config import instantiate
from mirotrain.config.tree import TrainConfig, replace_section
from mirotrain.optim.bf16_adamw import local_shard
from mirotrain.optim.precision import MODES, PrecisionMode, build_compensated_adamw, runs_fused
from mirotrain.training.layout import Layout

if TYPE_CHECKING:
    from mirotrain.commands.estimate import MemoryPlan

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class ModelSpec:
    """How every model of a run is built and parallelised (the policy and the DPO reference share it)."""

    component: dict
    attention_backend: str
    ac_mode: str
    ac_option: int | str | tuple[int, int, int] | None  # auto decided: (keep, op, attention) layer counts
    compile_model: bool
    compile_loss: bool
    compile_optimizer: bool  # the bf16 mode's optimizer step (mirotrain/optim/bf16_adamw.py)
    dtype_name: str
    master_weights: str  # what the sharded weights and optimizer state are kept in (mirotrain/optim/precision.py)
    cpu_offload: bool
    reshard_after_forward: bool
    offload_activations: bool  # saved activations to host memory (CUDA only)
    mlp_tiles: int             # dense MLPs in this many tiles (mirotrain/parallel/mlp_tiling.py)
    fp8_recipe: str | None = None  # float8 Linears in the decoder layers (mirotrain/parallel/float8.py); None: off

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device, world_size: int) -> "ModelSpec":
        m = cfg.model
        plan = _memory_plan(cfg, device, world_size)
        compile_model, compile_loss, compile_optimizer = m.compile_flags(device.type)
        if compile_loss and cfg.run.cudnn_deterministic_mode:
            # The loss kernel is compiled with dynamic shapes, whose launch configuration (and with it the order
            # of the vocabulary sums) follows the first chunk length it saw: a resumed run sees another one
            # first. Eager kernels choose from each call's own shape (mirotrain/training/determinism.py).
            compile_loss = False
        fp8_recipe = _fp8_recipe(cfg, device)
        return cls(component=dict(m.component), attention_backend=m.attention_backend, ac_mode=plan.ac_mode,
                   ac_option=plan.ac_option, compile_model=compile_model, compile_loss=compile_loss,
                   compile_optimizer=compile_optimizer,
                   dtype_name=cfg.run.dtype, master_weights=cfg.run.master_weights,
                   cpu_offload=cfg.parallel.fsdp_cpu_offload,
                   reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward,
                   offload_activations=m.enable_activation_offloading and device.type == "cuda",
                   mlp_tiles=plan.mlp_tiles, fp8_recipe=fp8_recipe)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def precision(self) -> PrecisionMode:
        return MODES[self.master_weights]

    def init_device(self, device: torch.device) -> torch.device:
        """Where the parameters live (and a random init draws them)."""
        return torch.device("cpu") if self.cpu_offload else device


def _fp8_recipe(cfg: TrainConfig, device: torch.device) -> str | None:
    """The FP8 recipe the run uses (None: FP8 off); refused at start-up on a GPU without float8 matmuls, which
    the config checks cannot see."""
    if not cfg.model.enable_fp8_training:
        return None
    from mirotrain.parallel.float8 import fp8_device_problem, recipe_of

    problem = fp8_device_problem(device)
    if problem is not None:
        raise ValueError(f"enable_fp8_training: {problem}; set enable_fp8_training: False")
    return recipe_of(cfg.model.fp8_recipe_name)


def build_meta_model(component: dict, attention_backend: str) -> nn.Module:
    """The model on the meta device (no memory), with the configured attention backend."""
    node = dict(component)
    node.setdefault("attention_backend", attention_backend)
    with torch.device("meta"):
        model = instantiate(node)
    return model


def _memory_plan(cfg: TrainConfig, device: torch.device, world_size: int) -> MemoryPlan:
    """AC and MLP tiling as the run applies them; the ``auto`` settings are decided from `mirotrain validate`'s
    estimate against the GPU's memory (mirotrain/commands/estimate.py: ``memory_plan``), the smallest card of
    the job's, so every rank builds the same model; the log gives the validate command that prints this plan.
    A plan the config settles (``settled_plan``: nothing ``auto``, or ``auto`` with nothing to decide) is taken
    as it is: no meta model, no estimate, no all-reduce."""
    import torch.distributed as dist

    from mirotrain.commands.estimate import describe_limit, estimate_memory, memory_limit, settled_plan

    settled = settled_plan(cfg, gpu_known=device.type == "cuda")
    if settled is not None:
        return settled
    # not settled: on CUDA (without a card every plan is settled), with a setting to decide against the card
    smallest = torch.tensor([torch.cuda.get_device_properties(device).total_memory], device=device)
    if dist.is_initialized():
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    gpu_bytes = int(smallest.item())
    model = build_meta_model(cfg.model.component, cfg.model.attention_backend)
    estimate = estimate_memory(model, cfg, world_size, gpu_bytes)
    plan = estimate.plan
    if estimate.total > memory_limit(cfg, gpu_bytes):
        log.warning("no plan of the auto settings fits %s (the lowest estimate: %.1f GiB per GPU); the run goes "
                    "ahead with it", describe_limit(cfg, gpu_bytes), estimate.total / 2**30)
    decided = []
    if cfg.model.ac_mode == "auto":
        decided.append(f"ac_mode: auto: {plan.describe(model.args.n_layers)}")
    if cfg.model.mlp_tiles == "auto" and plan.mlp_tiles > 1:
        decided.append(f"mlp_tiles: auto: each MLP runs in {plan.mlp_tiles} tiles, recomputed in backward "
                       "(mlp_tiles: 1 turns it off)")
    if decided:
        log.info("%s; by the memory estimate against %s (`mirotrain validate --world-size %d --gpu-memory-gib %.3f` "
                 "prints the same plan)", "; ".join(decided), describe_limit(cfg, gpu_bytes), world_size,
                 gpu_bytes / 2**30)
    return plan


def build_model(spec: ModelSpec, layout: Layout, checkpointer: Any, seed: int) -> nn.Module:
    """A sharded model on ``layout``: weights from ``checkpointer`` (an HF checkpointer), or a random init from
    ``seed`` when there is none."""
    from mirotrain.models.families import family_of
    from mirotrain.parallel.options import ParallelizeOptions

    model = build_meta_model(spec.component, spec.attention_backend)
    cast_parameters(model, spec.precision.param_dtype)
    hf_config = checkpointer.hf_config() if checkpointer is not None else None
    check_against_checkpoint(model, hf_config)
    args = model.args
    layout.meshes.dims.validate_model(args.n_heads, args.n_kv_heads, args.attention_backend, layout.device.type)
    family_of(args).parallelize(model, layout.meshes, ParallelizeOptions(
        device_type=layout.device.type, ac_mode=spec.ac_mode, ac_option=spec.ac_option, compile=spec.compile_model,
        param_dtype=spec.dtype, reduce_dtype=spec.precision.reduce_dtype, cpu_offload=spec.cpu_offload,
        reshard_after_forward=spec.reshard_after_forward, mlp_tiles=spec.mlp_tiles, fp8_recipe=spec.fp8_recipe))
    materialize(model, layout.device, spec.cpu_offload)
    if hf_config is not None:
        checkpointer.load_into(model)
        log.info("Loaded base weights from %s", checkpointer.checkpoint_dir)
    else:
        init_random(model, seed)
        log.info("checkpointer.checkpoint_dir is not set: random initialisation (seed %d)", seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("Model: %.3fB parameters, %d layers; AC=%s%s, mlp_tiles=%d, compile=%s, dtype=%s%s, master_weights=%s, "
             "world=%d (dp=%d, sp=%d, ep=%d)", n_params / 1e9, args.n_layers, spec.ac_mode,
             f"({spec.ac_option})" if spec.ac_option else "", spec.mlp_tiles, spec.compile_model, spec.dtype_name,
             f", fp8={spec.fp8_recipe}" if spec.fp8_recipe else "",
             spec.master_weights, layout.world_size, layout.dp_size, layout.sp_size, layout.meshes.dims.ep)
    return model


def check_against_checkpoint(model: nn.Module, hf_config: dict | None) -> None:
    """Fail early, naming the field, when the builder and the checkpoint's config.json disagree."""
    if hf_config is None:
        return
    from mirotrain.models.hf_config import args_from_hf_config

    ckpt = args_from_hf_config(hf_config)
    a = model.args
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                  "tie_word_embeddings", "num_experts"):
        if getattr(ckpt, field) != getattr(a, field):
            raise ValueError(f"model builder and checkpoint disagree on {field}: builder {getattr(a, field)!r}, "
                             f"checkpoint config.json {getattr(ckpt, field)!r}")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the (meta) model's parameters in ``dtype``, in place, so tied weights stay one parameter; buffers
    (RoPE's frequencies) keep their fp32."""
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def materialize(model: nn.Module, device: torch.device, cpu_offload: bool) -> None:
    """Allocate the (sharded) parameters on their device; RoPE buffers on the compute device."""
    model.to_empty(device="cpu" if cpu_offload else device)
    model.rope.to(device)
    model.rope.reset_parameters()


def init_device_signature(device: torch.device) -> str:
    """What a seeded random init depends on besides the seed: the generator's device type and, on CUDA,
    the SM count (``normal_`` sizes its launch grid, and so its random stream, by it)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda:{props.name}:{props.multi_processor_count}"
    return device.type


@torch.no_grad()
def init_random(model: nn.Module, seed: int) -> None:
    """Random initialisation that also works on FSDP-sharded parameters.

    The model's own ``init_weights`` draws each full tensor from one seeded generator and copies it in;
    under ``implicit_replication`` that copy into a DTensor keeps only the local rows, so every world size
    gives the same weights (and only one full tensor at a time is ever in memory). The generator lives on
    the parameters' device: on CUDA that turns ~1 minute of CPU sampling per rank (8B) into about a second.
    """
    from torch.distributed.tensor.experimental import implicit_replication

    device = next(model.parameters()).device
    with implicit_replication():
        model.init_weights(seed=seed, device=device)


# ------------------------------------------------------------------------------------------------ optim


def build_optimizer(node: dict, model: nn.Module, master_weights: str, state_offload: bool = False,
                    compiled: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over all parameters; Adam(W) is fused by default (torch has fused CPU and
    CUDA kernels; CPU-resident parameters under fsdp_cpu_offload use the CPU kernel). ``master_weights: bf16``
    runs the compensated AdamW with the section's hyper-parameters instead (mirotrain/optim/precision.py), its
    state in host memory with ``state_offload`` (``optimizer_state_offload``, which the config check allows
    only in that mode), its update one compiled kernel per parameter with ``compiled``."""
    node = dict(node)
    node.pop("params", None)
    if master_weights == "bf16":
        params = [p for p in model.parameters() if p.requires_grad]
        if state_offload:
            host = MODES["bf16"].optimizer_bytes * sum(local_shard(p).numel() for p in params)
            log.info("optimizer_state_offload: the AdamW moments and compensation (%.1f GiB on this rank) live in "
                     "host memory, allocated at the first step and streamed through the GPU at every step",
                     host / 2**30)
        return build_compensated_adamw(node, params, state_offload, compiled)
    if node.get("fused") is None and runs_fused(node):
        node["fused"] = True
    return instantiate(node, params=[p for p in model.parameters() if p.requires_grad])


def build_lr_scheduler(node: dict | None, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The configured schedule with ``num_training_steps`` injected; constant LR when none is configured."""
    if node is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    node = {k: v for k, v in node.items() if k not in ("optimizer", "num_training_steps", "last_epoch")}
    return instantiate(node, optimizer=optimizer, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------- data


def build_tokenizer(node: dict | None) -> Any:
    return instantiate(node) if node is not None else None


def tokenizer_dir(cfg: TrainConfig) -> str | None:
    """Directory of the tokenizer files to copy into HF exports: tokenizer.path, else the base checkpoint, else
    (``path: null``) the bundled Qwen3 tokenizer the tokenizer itself falls back to."""
    if cfg.tokenizer.path:
        return str(cfg.tokenizer.path)
    if cfg.checkpoint.checkpoint_dir:
        return str(cfg.checkpoint.checkpoint_dir)
    if cfg.tokenizer.component is not None:
        from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir

        return str(bundled_tokenizer_dir())
    return None


def build_loader(cfg: TrainConfig, section: str, layout: Layout, *, seed: int, tokenizer: Any) -> Any:
    """The loader of ``section`` (``dataset`` or ``dataset_val``, with its own batch size) for this rank."""
    from mirotrain.data.loader import build_train_loader

    cfg = replace_section(cfg, "data", batch_size=cfg.data.batch_size_of(section))
    return build_train_loader(cfg, section, dp_rank=layout.dp_rank, dp_size=layout.dp_size, seed=seed,
                              tokenizer=tokenizer)
