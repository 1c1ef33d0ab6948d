"""What a family's ``parallelize`` applies besides the meshes: AC, compile and the FSDP settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelizeOptions:
    """Settings of the training-time wrappers (``models/<family>/parallelize.py`` applies them).

    Attributes:
        device_type: ``cuda`` or ``cpu``; decides which attention backends sequence parallelism accepts.
        ac_mode, ac_option: activation checkpointing (``parallel/activation_checkpoint.py``: ``resolve_ac``; ``auto``
            decided: the ``(keep, op, attention)`` layer counts of ``layer_levels``).
        compile: torch.compile each decoder layer.
        param_dtype: dtype FSDP gathers parameters in for compute.
        reduce_dtype: dtype gradients are reduce-scattered in (fp32 for fp32 master weights, bf16 for bf16 ones).
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory.
        reshard_after_forward: free gathered layer parameters after forward (ZeRO-3) or keep them (ZeRO-2).
        mlp_tiles: dense MLPs run in this many tiles, recomputed in backward (``parallel/mlp_tiling.py``).
        fp8_recipe: the decoder layers' Linears run float8 matmuls with this torchao recipe (``parallel/float8.py``);
            None: they stay in ``param_dtype``.
    """

    device_type: str
    ac_mode: str = "none"
    ac_option: int | str | tuple[int, int, int] | None = None
    compile: bool = False
    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype = torch.float32
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    mlp_tiles: int = 1
    fp8_recipe: str | None = None
