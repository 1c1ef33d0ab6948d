"""How a run stores its weights and optimizer state (config key ``master_weights``), and what that costs.

Compute is bf16 in every mode (``dtype: bf16``); the modes differ in what FSDP2 keeps sharded between steps:

- ``fp32`` (default): fp32 master weights gathered in bf16 for compute, gradients reduced and kept in fp32,
  torch's AdamW with fp32 moments: 4 + 4 + 8 = 16 bytes per parameter.
- ``bf16``: bf16 weights and gradients (reduced in bf16), :class:`~mirotrain.optim.bf16_adamw.CompensatedAdamW`
  with bf16 moments and a bf16 compensation buffer that keeps updates below the weight's bf16 ulp:
  2 + 2 + 4 + 2 = 10 bytes.
- ``bf16_plain``: as ``bf16`` but the configured optimizer (torch's AdamW) on the bf16 weights, every update
  rounded to nearest (MiroTrain's mode): 2 + 2 + 4 = 8 bytes. Updates under half a bf16 ulp of a weight are
  lost; it is kept to show where that matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from mirotrain.config.schema import COMPENSATED_ADAMW_KEYS
from mirotrain.optim.bf16_adamw import CompensatedAdamW, local_shard


@dataclass(frozen=True)
class PrecisionMode:
    """One ``master_weights`` mode: the dtypes FSDP2 shards and reduces in, and the bytes per parameter."""

    name: str
    param_dtype: torch.dtype   # the sharded weights and their gradients
    reduce_dtype: torch.dtype  # gradient reduce-scatter
    state_bytes: int           # weight + gradient + optimizer state, per parameter
    checkpoint_bytes: int      # weight + optimizer state (gradients are not saved)
    holds: str                 # what the state is, for `mirotrain validate`

    @property
    def optimizer_bytes(self) -> int:
        """The optimizer's state per parameter (the state less the weight and its gradient): what
        ``optimizer_state_offload`` keeps in host memory in the ``bf16`` mode (moments and compensation: 6)."""
        return self.state_bytes - 2 * self.param_dtype.itemsize


MODES: dict[str, PrecisionMode] = {
    "fp32": PrecisionMode("fp32", torch.float32, torch.float32, 16, 12,
                          "fp32 master weights, gradients, AdamW moments"),
    "bf16": PrecisionMode("bf16", torch.bfloat16, torch.bfloat16, 10, 8,
                          "bf16 weights, gradients, AdamW moments and update compensation"),
    "bf16_plain": PrecisionMode("bf16_plain", torch.bfloat16, torch.bfloat16, 8, 6,
                                "bf16 weights, gradients and AdamW moments, updates rounded to nearest"),
}


def runs_fused(node: dict) -> bool:
    """Whether the optimizer ``node`` runs fused: as it says, else Adam(W) unless it asks for ``foreach``
    (torch has fused CPU and CUDA Adam(W) kernels; ``build_optimizer`` and validate's estimate share this)."""
    if node.get("fused") is not None:
        return bool(node["fused"])
    name = str(node.get("_component_", ""))
    return (name.endswith("AdamW") or name.endswith("Adam")) and not node.get("foreach")


def build_compensated_adamw(node: dict, params: Iterable[nn.Parameter], offload_state: bool = False,
                            compiled: bool = False) -> torch.optim.Optimizer:
    """The ``bf16`` mode's optimizer with the section's hyper-parameters (torch AdamW's defaults otherwise; the
    section's other keys are refused by the config check, ``OptimConfig.check``); ``offload_state``: its moments
    and compensation in host memory (config key ``optimizer_state_offload``); ``compiled``: its update as one
    compiled kernel per parameter (``compile``'s optimizer_step)."""
    kwargs = {k: node[k] for k in COMPENSATED_ADAMW_KEYS if k in node}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return CompensatedAdamW(params, offload_state=offload_state, compiled=compiled, **kwargs)


def measured_bytes_per_param(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Bytes per parameter this rank holds between steps, counted from the tensors themselves: each weight
    shard, its gradient (FSDP2 keeps it in the weight's dtype; counted whether or not it is allocated now) and
    every optimizer state tensor of it except the scalar step counters."""
    numel = held = 0
    for p in model.parameters():
        local = local_shard(p)
        numel += local.numel()
        held += local.numel() * local.element_size() * (2 if p.requires_grad else 1)
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value = local_shard(value)
                held += value.numel() * value.element_size()
    return held / max(numel, 1)
