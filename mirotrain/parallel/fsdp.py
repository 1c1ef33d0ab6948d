"""FSDP2 (``fully_shard``) for Qwen3: one unit per decoder layer, then the root (embedding, norm, LM head).

Parameters stay sharded in the dtype they have (fp32 master weights, or bf16 under ``master_weights: bf16``);
with ``param_dtype=bf16`` FSDP all-gathers them in bf16 for compute and reduce-scatters gradients in
``reduce_dtype`` (fp32 for fp32 masters, bf16 for bf16 weights). Every unit divides gradients by the
same factor, the size of the data-parallel mesh, so units sharded over smaller meshes (MoE experts under
expert parallelism, see ``parallel/expert_parallel.py``) are scaled like the rest. ``forward_hidden`` is
registered as a forward method so the fused losses can call it directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method,
)


def mixed_precision_policy(param_dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32) -> MixedPrecisionPolicy:
    """Compute in ``param_dtype``, reduce gradients in ``reduce_dtype``: bf16 compute with fp32 reduction for fp32
    master weights; bf16 throughout for bf16 weights; everything fp32 for CPU runs."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype = torch.bfloat16,
               reduce_dtype: torch.dtype = torch.float32, cpu_offload: bool = False,
               reshard_after_forward: bool = True, expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard ``model`` in place (per layer, then root) and return it.

    Args:
        mesh: 1-D data-parallel mesh (every rank that shares the dense gradients).
        param_dtype: dtype parameters are gathered in for compute.
        reduce_dtype: dtype gradients are reduce-scattered in.
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory.
        reshard_after_forward: free gathered layer parameters after forward (ZeRO-3) or keep them (ZeRO-2).
        expert_mesh: under expert parallelism, the ("edp") mesh the MoE experts are sharded over (their own
            FSDP unit inside each layer, dividing by the size of ``mesh`` like everything else).
    """
    mp = mixed_precision_policy(param_dtype, reduce_dtype)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    layers = list(model.layers)
    divide = float(mesh.size())
    # A divide factor other than the mesh size makes FSDP reduce with PREMUL_SUM, which gloo lacks: there the
    # experts reduce with SUM and divide afterwards (a mesh of size 1 never communicates).
    experts_sum_only = (expert_mesh is not None and expert_mesh.size() > 1
                        and dist.get_backend(expert_mesh.get_group()) == "gloo")
    for i, layer in enumerate(layers):
        experts = getattr(getattr(layer, "feed_forward", None), "experts", None)
        if expert_mesh is not None and experts is not None:
            fully_shard(experts, mesh=expert_mesh, mp_policy=mp, offload_policy=offload,
                        reshard_after_forward=reshard_after_forward)
            experts.set_gradient_divide_factor(divide)
            if experts_sum_only:
                experts.set_force_sum_reduction_for_comms(True)
        # The last layer's parameters would be gathered again at once for backward: keep them.
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    # The root (embedding, final norm, LM head) stays gathered after forward: the loss uses the LM head
    # weight right after ``forward_hidden`` returns, and backward needs it at once anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    register_fsdp_forward_method(model, "forward_hidden")
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
