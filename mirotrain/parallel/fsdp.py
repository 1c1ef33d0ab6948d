"""FSDP2 (``fully_shard``) for Qwen3: one unit per decoder layer, then the root (embedding, norm, LM head).

Parameters stay fp32 and sharded (the master weights); with ``param_dtype=bf16`` FSDP all-gathers them in
bf16 for compute and reduce-scatters gradients in ``reduce_dtype`` (fp32). Every unit divides gradients by the
same factor (the data-parallel world size), so units sharded over smaller meshes (MoE experts under expert
parallelism) are scaled like the rest — the system we replace divided expert gradients by a different
number. ``forward_hidden`` is registered as a forward method so the fused losses can call it directly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method,
)


def mixed_precision_policy(param_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 reduction on GPU; everything fp32 for CPU runs."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype = torch.bfloat16,
               cpu_offload: bool = False, reshard_after_forward: bool = True,
               gradient_divide_factor: float | None = None, expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard ``model`` in place (per layer, then root) and return it.

    Args:
        mesh: 1-D data-parallel mesh (FSDP) or 2-D (replicate, shard) mesh (HSDP).
        param_dtype: dtype parameters are gathered in for compute.
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory.
        reshard_after_forward: free gathered layer parameters after forward (ZeRO-3) or keep them (ZeRO-2).
        gradient_divide_factor: divide reduced gradients by this (default: the mesh size); pass the full data-
            parallel size when some units live on smaller meshes.
        expert_mesh: under expert parallelism, the ("edp") mesh the MoE experts are sharded over (their own
            FSDP unit inside each layer, dividing by the full data-parallel size like everything else).
    """
    mp = mixed_precision_policy(param_dtype)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    layers = list(model.layers)
    divide = float(gradient_divide_factor) if gradient_divide_factor is not None else float(mesh.size())
    for i, layer in enumerate(layers):
        experts = getattr(getattr(layer, "feed_forward", None), "experts", None)
        if expert_mesh is not None and experts is not None:
            fully_shard(experts, mesh=expert_mesh, mp_policy=mp, offload_policy=offload,
                        reshard_after_forward=reshard_after_forward)
            experts.set_gradient_divide_factor(divide)
        # The last layer's parameters would be gathered again at once for backward: keep them.
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    # The root (embedding, final norm, LM head) stays gathered after forward: the loss uses the LM head
    # weight right after ``forward_hidden`` returns, and backward needs it at once anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    register_fsdp_forward_method(model, "forward_hidden")
    if gradient_divide_factor is not None and hasattr(FSDPModule, "set_gradient_divide_factor"):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(gradient_divide_factor)
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
