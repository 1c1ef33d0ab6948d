"""Parallelise a single-device Qwen3 from outside, in a fixed order: SP -> FP8 Linears -> MLP tiling -> AC -> compile
-> FSDP.

Sequence parallelism only swaps each attention kernel for the Ulysses exchange (``parallel/ulysses.py``), so
it goes first, on the plain module tree. FP8 training swaps the decoder layers' Linears for float8 ones
(``parallel/float8.py``) before FSDP, whose all-gathers then move fp8 weights (tensorwise recipe). MLP tiling
swaps each dense MLP's class for its tiled twin (``parallel/mlp_tiling.py``). Activation checkpointing wraps each
layer before compile traces it (recomputation is then part of the compiled region), and FSDP goes last so its
hooks see the final modules.
The model code knows nothing of any of this. Works on a model on the meta device (nothing is allocated).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from mirotrain.parallel.activation_checkpoint import apply_activation_checkpointing
from mirotrain.parallel.compile import apply_compile
from mirotrain.parallel.float8 import apply_float8_training
from mirotrain.parallel.fsdp import apply_fsdp
from mirotrain.parallel.mesh import ParallelMeshes
from mirotrain.parallel.mlp_tiling import apply_mlp_tiling
from mirotrain.parallel.norm_recompute import apply_norm_recompute
from mirotrain.parallel.options import ParallelizeOptions
from mirotrain.parallel.ulysses import apply_ulysses


def apply_sequence_parallel(model: nn.Module, meshes: ParallelMeshes, options: ParallelizeOptions) -> None:
    """SP step: the Ulysses exchange around every attention kernel when the SP group has several ranks."""
    if meshes.sp_size > 1:
        apply_ulysses(model, meshes.sp_group, device_type=options.device_type)


def apply_ac_compile_fsdp(model: nn.Module, meshes: ParallelMeshes, options: ParallelizeOptions,
                          expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """The steps after SP (and EP): FP8 Linears -> MLP tiling -> norm recompute (eager layers) -> AC -> compile ->
    FSDP over every dp × sp rank (the experts over ``expert_mesh`` when expert parallelism sharded them)."""
    if options.fp8_recipe is not None:
        if options.mlp_tiles > 1:  # a tiled MLP multiplies the weights itself, past the float8 Linears
            raise ValueError(f"enable_fp8_training runs the MLP's Linears in fp8; mlp_tiles ({options.mlp_tiles}) "
                             "would bypass them: use mlp_tiles: 1")
        apply_float8_training(model, options.fp8_recipe, sharded=meshes.fsdp.size() > 1)
    apply_mlp_tiling(model, options.mlp_tiles)
    if not options.compile:
        apply_norm_recompute(model)
    apply_activation_checkpointing(model, options.ac_mode, options.ac_option)
    if options.compile:
        apply_compile(model)
    return apply_fsdp(model, meshes.fsdp, param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype,
                      cpu_offload=options.cpu_offload, reshard_after_forward=options.reshard_after_forward,
                      expert_mesh=expert_mesh)


def parallelize_qwen3(model: nn.Module, meshes: ParallelMeshes, options: ParallelizeOptions) -> nn.Module:
    """SP -> AC -> compile -> FSDP on a dense Qwen3, in place; returns it (a dense model has no experts for EP)."""
    apply_sequence_parallel(model, meshes, options)
    return apply_ac_compile_fsdp(model, meshes, options)
