"""Parallelise a single-device Qwen3-MoE from outside: SP -> EP -> AC -> compile -> FSDP.

The dense steps are those of ``models/qwen3/parallelize.py``. Expert parallelism comes after SP and before
AC: it shards the stacked expert weights over the "ep" mesh and swaps each MoE layer's dispatcher for the
all-to-all one (``parallel/expert_parallel.py``); FSDP then gives the experts their own unit over "edp".
"""

from __future__ import annotations

from torch import nn

from mirotrain.models.qwen3.parallelize import apply_ac_compile_fsdp, apply_sequence_parallel
from mirotrain.parallel.expert_parallel import apply_expert_parallel
from mirotrain.parallel.mesh import ParallelMeshes
from mirotrain.parallel.options import ParallelizeOptions


def parallelize_qwen3_moe(model: nn.Module, meshes: ParallelMeshes, options: ParallelizeOptions) -> nn.Module:
    """SP -> EP -> AC -> compile -> FSDP on a Qwen3-MoE, in place; returns it."""
    apply_sequence_parallel(model, meshes, options)
    expert_mesh = None
    if meshes.ep_mesh is not None:
        apply_expert_parallel(model, meshes.ep_mesh["ep"])
        expert_mesh = meshes.ep_mesh["edp"]
    return apply_ac_compile_fsdp(model, meshes, options, expert_mesh=expert_mesh)
