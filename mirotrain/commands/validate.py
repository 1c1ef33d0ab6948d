"""`mirotrain validate --config X [k=v ...] [--world-size N]`: check a config without touching data or weights.

Runs the config checks of ``mirotrain.config.validation`` (the ones `pack`, `sft` and `dpo` run first). On a
valid config it builds the model on the meta device and prints the parameter count, the parallel layout and
a per-GPU memory estimate; otherwise it prints one line per error, naming the file and the key path, and exits 2.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mirotrain.checkpoint.host_memory import HOST_MEMORY_FRACTION, available_host_bytes, plan_host_memory
from mirotrain.commands.errors import add_debug_flag, reports_user_errors
from mirotrain.commands.estimate import (GIB, MEMORY_WARN_FRACTION, MemoryEstimate, checkpoint_footprint, describe_limit,
                                         estimate_memory, step_terms)
from mirotrain.config import ConfigError, instantiate, load_config
from mirotrain.config.compat import master_weights_notice
from mirotrain.config.tree import TrainConfig
from mirotrain.config.validation import InvalidConfig, validate_config
from mirotrain.data.pack_shards import existing_shards
from mirotrain.data.preference import PairsPerRow
from mirotrain.data.shards import read_manifest
from mirotrain.optim.precision import MODES


def _check_against_model(args: Any, cfg: TrainConfig, ns: argparse.Namespace) -> list[ConfigError]:
    """The rules that need the model's shapes: heads per SP rank, experts per EP rank, MLP tiles."""
    errors = []
    sp, ep = cfg.parallel.ulysses_sequence_parallel_size, cfg.parallel.moe_expert_parallel_size
    if sp > 1:
        from mirotrain.parallel.mesh import ParallelDims

        try:
            ParallelDims(ns.world_size, sp=sp).validate_model(args.n_heads, args.n_kv_heads,
                                                               cfg.model.attention_backend, cfg.run.device)
        except ValueError as exc:
            errors.append(ConfigError("ulysses_sequence_parallel_size", str(exc)))
    tiles = cfg.model.mlp_tiles
    if tiles not in ("auto", 1) and args.is_moe:
        errors.append(ConfigError("mlp_tiles", f"({tiles}) tiles dense MLPs; this MoE model has none (use 1 or auto)"))
    elif tiles not in ("auto", 1) and tiles > args.hidden_dim:
        errors.append(ConfigError("mlp_tiles", f"({tiles}) must be at most the MLP hidden width ({args.hidden_dim})"))
    if ep > 1 and (not args.is_moe or args.num_experts % ep):
        errors.append(ConfigError("moe_expert_parallel_size", f"({ep}) must divide the number of experts ({args.num_experts})"))
    return errors


def _print_plan(model: torch.nn.Module, cfg: TrainConfig, ns: argparse.Namespace) -> None:
    """Parameters, layout, per-GPU memory and checkpoint sizes of a valid config."""
    args = model.args
    sp, ep = cfg.parallel.ulysses_sequence_parallel_size, cfg.parallel.moe_expert_parallel_size
    estimate = estimate_memory(model, cfg, ns.world_size, int(ns.gpu_memory_gib * GIB))
    mem = estimate.gib()
    dp = ns.world_size // sp
    print(f"config:      {ns.config}")
    print(f"model:       {cfg.model.component.get('_component_')}  {mem['params']:,} parameters "
          f"({args.n_layers} layers, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads"
          f"{f', {args.num_experts} experts top-{args.num_experts_per_tok}' if args.is_moe else ''})")
    print(f"layout:      world {ns.world_size} = data-parallel {dp} × sequence-parallel {sp}; "
          f"expert-parallel {ep}; FSDP2 full shard over {ns.world_size} ranks")
    if estimate.objective == "dpo":
        _print_pairs_per_step(cfg, ns, dp)
    _print_memory(estimate, cfg, ns)
    _print_memory_plan(model, cfg, ns, estimate)
    if cfg.model.enable_fp8_training:
        _print_fp8(model, cfg, ns)
    staging = 0.0
    if cfg.checkpoint.auto_resume:
        ckpt = checkpoint_footprint(model, cfg, ns.world_size, ns.gpus_per_node)
        keep = cfg.checkpoint.keep_last_n_checkpoints
        host = (f"; async saves keep ~{ckpt['host_per_node']:.0f} GiB of host memory per node of "
                f"{min(ns.gpus_per_node, ns.world_size)} GPUs" if cfg.checkpoint.enable_async_checkpointing else "")
        print(f"checkpoints: ~{ckpt['size']:.0f} GiB each on disk (keep {keep}: up to "
              f"~{(keep + 1) * ckpt['size']:.0f} GiB while the next one is written){host}")
        _print_checkpoint_host_memory(cfg, ckpt["host_per_node"])
        staging = ckpt["host_per_node"] if cfg.checkpoint.enable_async_checkpointing else 0.0
    if estimate.optimizer_offload:
        _print_host_memory(estimate, ns, staging)


def _print_pairs_per_step(cfg: TrainConfig, ns: argparse.Namespace, dp: int) -> None:
    """DPO: the pairs an optimizer step trains, and why. A step trains batch_size × GA × data-parallel rows;
    packed rows hold as many pairs as fit, counted by `mirotrain pack` in the shards' manifest, and
    one_pair_per_row holds one, as MiroTrain's batch_size counted pairs."""
    ga, shard_dir = cfg.optim.gradient_accumulation_steps, cfg.data.dataset.shard_dir
    rows = cfg.data.batch_size * ga * dp
    why = f"batch_size {cfg.data.batch_size} × gradient_accumulation_steps {ga} × data-parallel {dp}"
    if cfg.dpo.one_pair_per_row and not shard_dir:
        print(f"pairs/step:  {rows} = {why}: one pair per row (one_pair_per_row), as MiroTrain counted them")
        return
    found = _measured_pairs(cfg)
    if isinstance(found, str):
        pack = "mirotrain pack " + shlex.join(["--config", str(ns.config), *ns.overrides])
        length = cfg.data.dataset.packed_seq_len
        print(f"pairs/step:  not yet known: {rows} rows ({why}), each holding as many pairs as fit in "
              f"{f'{length:,} tokens' if length else 'a row'}; {found}: `{pack}` packs them, then validate prints "
              "the measured pairs per row")
    else:
        where, stats = found
        spread = "" if stats.fewest is None else (f", {stats.fewest} per row" if stats.fewest == stats.most
                                                  else f", {stats.fewest} to {stats.most} per row")
        print(f"pairs/step:  ~{rows * stats.mean:,.0f} = {rows} rows ({why}) × {stats.mean:.2f} pairs per row "
              f"(measured in {where}: {stats.pairs:,} pairs in {stats.rows:,} rows{spread})")
        if cfg.dpo.one_pair_per_row and stats.pairs != stats.rows:
            print(f"warning:     one_pair_per_row applies when pairs are packed, but shard_dir {where} was packed "
                  "with several pairs per row: pack without shard_dir to get one pair per row")
            return
    if not cfg.dpo.one_pair_per_row:
        print(f"notice:      batch_size counts packed rows, not pairs; one_pair_per_row: true packs one pair per "
              f"row, so a step trains exactly {rows} pairs, as MiroTrain's batch_size did (rows padded: slower)")


def _measured_pairs(cfg: TrainConfig) -> tuple[str, PairsPerRow] | str:
    """The training section's shard directory and its pairs per row, or why they are not known."""
    ds_cfg, tokenizer_path = cfg.data.dataset, cfg.tokenizer.path
    if not ds_cfg.shard_dir and tokenizer_path is not None and not Path(tokenizer_path).is_dir():
        return f"the packed shards cannot be looked up (tokenizer.path {tokenizer_path} is not a local directory)"
    try:
        shard_dir = existing_shards(cfg)
        if shard_dir is not None:
            return shard_dir, PairsPerRow.of(read_manifest(shard_dir))
    except (OSError, ValueError, TypeError) as exc:
        return f"the packed shards cannot be looked up ({exc})"
    return "the pairs are not packed yet"


def _print_memory(estimate: MemoryEstimate, cfg: TrainConfig, ns: argparse.Namespace) -> None:
    """The tokens a GPU computes, the per-GPU estimate with its terms (``commands/estimate.py``), where the
    state lives, and the out-of-memory warning."""
    mem = estimate.gib()
    sp = cfg.parallel.ulysses_sequence_parallel_size
    row = (f"DPO row of {estimate.row_tokens:,} tokens: pairs, chosen and rejected" if estimate.objective == "dpo"
           else f"rows of {estimate.row_tokens:,} tokens")
    print(f"tokens/GPU:  {mem['tokens_per_gpu']:,} per micro-batch ({row}{f', / SP {sp}' if sp > 1 else ''})")
    labels = (("reference", "live reference"), ("all_to_all", "SP all-to-all"), ("buffers", "grad/reduce buffers"))
    extra = "".join(f", {label} {mem[key]:.1f}" for key, label in labels if mem[key])
    print("memory/GPU:  ~{total:.1f} GiB at the {phase} (sharded state {sharded_state:.1f}, gathered params "
          "{gathered_params:.1f}, activations {activations:.1f}, loss {loss:.1f}".format(**mem) + f"{extra})")
    where = "GPU"
    ranks = min(ns.gpus_per_node, ns.world_size)
    if estimate.offload:
        where = (f"host (fsdp_cpu_offload): ~{mem['host_state_per_rank'] * ranks:.1f} GiB of host memory per node of "
                 f"{ranks} GPUs")
    elif estimate.optimizer_offload:
        held = MODES[cfg.run.master_weights].optimizer_bytes
        where = (f"GPU: weights and gradients {estimate.state_bytes_per_param - held}; AdamW moments and compensation "
                 f"{held} in host memory (optimizer_state_offload): ~{mem['host_state_per_rank'] * ranks:.1f} GiB "
                 f"pinned per node of {ranks} GPUs, streamed through each GPU at every step")
    if estimate.host_activations_per_rank:
        print(f"activations: offloaded (enable_activation_offloading): ~{mem['host_activations_per_rank'] * ranks:.1f} "
              f"GiB of pinned host memory per node of {ranks} GPUs")
    mode = MODES[cfg.run.master_weights]
    print(f"state:       {estimate.state_bytes_per_param} bytes/param, master_weights: {mode.name} ({mode.holds}), "
          f"sharded over {ns.world_size} ranks, on the {where}")
    notice = master_weights_notice(cfg.run.dtype, cfg.written)
    if notice:
        print(f"notice:      {notice}")
    if mem["total"] > MEMORY_WARN_FRACTION * ns.gpu_memory_gib:
        print(f"warning:     that is above {MEMORY_WARN_FRACTION:.0%} of a {ns.gpu_memory_gib:g} GiB GPU "
              "(--gpu-memory-gib): expect an out-of-memory error; raise ulysses_sequence_parallel_size (splits "
              "the activations), use more GPUs (splits the state) or shorten dataset.packed_seq_len")
    elif cfg.model.memory_budget_gib is not None and mem["total"] > cfg.model.memory_budget_gib:
        print(f"warning:     that is above memory_budget_gib ({cfg.model.memory_budget_gib:g} GiB): no plan of the auto "
              "settings fits it; the run goes ahead with the plan of the lowest estimate")


def _print_memory_plan(model: torch.nn.Module, cfg: TrainConfig, ns: argparse.Namespace,
                       estimate: MemoryEstimate) -> None:
    """What the ``auto`` activation settings decided on this GPU size (``memory_plan``), what tiling saves and
    what either costs."""
    plan, n = estimate.plan, model.args.n_layers
    if cfg.model.ac_mode == "auto":
        print(f"plan:        ac_mode: auto: {plan.describe(n)}; by the estimate against "
              f"{describe_limit(cfg, int(ns.gpu_memory_gib * GIB))}")
    if plan.mlp_tiles == 1:
        return
    untiled = max(t.total for t in step_terms(model, cfg, ns.world_size, replace(plan, mlp_tiles=1)).values())
    how = "mlp_tiles: auto" if cfg.model.mlp_tiles == "auto" else "mlp_tiles"
    print(f"plan:        {how}: each MLP runs in {plan.mlp_tiles} tiles of its hidden width, recomputed in "
          f"its backward: ~{(untiled - estimate.total) / GIB:.1f} GiB less per GPU for one more MLP forward per "
          "step (set mlp_tiles: 1 to turn it off)")


def _print_fp8(model: torch.nn.Module, cfg: TrainConfig, ns: argparse.Namespace) -> None:
    """Which Linears run float8 matmuls with which recipe (mirotrain/parallel/float8.py), what stays in the
    compute dtype, and what is checked only at start-up."""
    from mirotrain.parallel.float8 import is_fp8_linear, recipe_of

    recipe = recipe_of(cfg.model.fp8_recipe_name)
    converted = sum(is_fp8_linear(m, fqn) for fqn, m in model.named_modules())
    kept = "embedding, LM head, norms" + (", MoE router and experts" if model.args.is_moe else "")
    gather = ("weights all-gathered in fp8, scales after each optimizer step" if recipe == "tensorwise"
              and ns.world_size > 1 else "weights all-gathered in the compute dtype")
    print(f"fp8:         enable_fp8_training: {recipe} float8 matmuls in {converted} Linears (attention q/k/v/o and "
          f"dense MLPs of {model.args.n_layers} decoder layers); {kept} in {cfg.run.dtype}; {gather}; needs compute "
          "capability >= 8.9 (checked at start-up); the memory estimate above counts bf16 matmuls")


def _print_host_memory(estimate: MemoryEstimate, ns: argparse.Namespace, staging_gib: float) -> None:
    """With ``optimizer_state_offload``: the host memory a node's ranks hold, added up (the pinned optimizer
    state and offloaded activations, the async checkpoint staging), and what a node like this one would do with
    it. The step checkpointer measures the available memory after the first step, the state already allocated,
    and saves synchronously when the staging does not fit in its share of the rest
    (``checkpoint/host_memory.py``); validate predicts that from this host's available memory."""
    mem = estimate.gib()
    ranks = min(ns.gpus_per_node, ns.world_size)
    pinned = (mem["host_state_per_rank"] + mem["host_activations_per_rank"]) * ranks
    terms = (("optimizer state", mem["host_state_per_rank"] * ranks),
             ("offloaded activations", mem["host_activations_per_rank"] * ranks), ("async checkpoint staging", staging_gib))
    available = available_host_bytes()
    have = "unknown" if available is None else f"{available / GIB:.0f} GiB"
    print(f"host memory: ~{pinned + staging_gib:.1f} GiB per node of {ranks} GPUs ("
          + " + ".join(f"{label} {gib:.1f}" for label, gib in terms if gib) + f"; available on this host: {have})")
    if available is None:
        return
    available_gib = available / GIB
    if pinned > HOST_MEMORY_FRACTION * available_gib:
        print(f"warning:     on a node like this one the pinned host memory (~{pinned:.1f} GiB) is above "
              f"{HOST_MEMORY_FRACTION:.0%} of the {available_gib:.0f} GiB available: expect the host to run out of "
              "memory at the first step; use more GPUs (splits the state) or drop optimizer_state_offload")
    elif staging_gib > HOST_MEMORY_FRACTION * (available_gib - pinned):
        print("warning:     on a node like this one step checkpoints would be saved synchronously: the async "
              "staging buffers do not fit beside the offloaded optimizer state")


def _print_checkpoint_host_memory(cfg: TrainConfig, per_node_gib: float) -> None:
    """Where output_dir is on tmpfs/ramfs its checkpoint files are host memory too: the total per node, and the
    save mode the trainer will pick on a node like this one (``checkpoint/host_memory.py``)."""
    if not cfg.run.output_dir:
        return
    async_save = cfg.checkpoint.enable_async_checkpointing
    per_node = int(per_node_gib * GIB)
    plan = plan_host_memory(Path(cfg.run.output_dir) / "checkpoints", staging=per_node if async_save else 0,
                            checkpoint=per_node, keep_last_n=cfg.checkpoint.keep_last_n_checkpoints,
                            available=available_host_bytes())
    if not plan.in_memory:
        return
    have = "unknown" if plan.available is None else f"{plan.available / GIB:.0f} GiB"
    print(f"host memory: {cfg.run.output_dir} is on {plan.fs_type}: its checkpoints take ~{plan.checkpoints / GIB:.0f} "
          f"GiB of host memory per node{f' + ~{plan.staging / GIB:.0f} GiB of async staging' if async_save else ''} "
          f"= ~{(plan.checkpoints + plan.staging) / GIB:.0f} GiB (available on this host: {have})")
    mode = plan.mode(async_save)
    if mode == "refuse":
        print(f"warning:     on a node like this one training would stop at its first save: {plan.refusal()}")
    elif mode == "sync" and async_save:
        print("warning:     on a node like this one step checkpoints would be saved synchronously: the async staging "
              "buffers and the checkpoint files do not fit together")


@reports_user_errors("mirotrain validate")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mirotrain validate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for the host-memory figure (default 8)")
    parser.add_argument("--gpu-memory-gib", type=float, default=79.2,
                        help="memory of one GPU, for the out-of-memory warning (default 79.2: an 80 GB H100)")
    parser.add_argument("--no-file-check", action="store_true", help="do not require local paths to exist")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    ns = add_debug_flag(parser).parse_args(argv)
    raw = load_config(ns.config, ns.overrides)
    errors = validate_config(raw, ns.world_size, check_files=not ns.no_file_check)
    model = None
    if "model" in raw and not errors:
        try:
            with torch.device("meta"):
                model = instantiate(raw["model"])
        except (TypeError, ValueError, KeyError) as exc:
            errors.append(ConfigError("model", f"{type(exc).__name__}: {exc}"))
    if model is not None:
        cfg = TrainConfig.from_dict(raw)
        errors.extend(_check_against_model(model.args, cfg, ns))
        _print_plan(model, cfg, ns)
    if errors:
        raise InvalidConfig(errors, ns.config)
    print("config is valid")
    return 0
