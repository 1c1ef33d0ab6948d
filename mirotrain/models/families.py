"""The model families, by ``config.json``'s ``model_type``: model class, state-dict adapter, parallelize.

The table is explicit: a family is added here, not registered by importing its package. Everything that
depends on the family (building, HF loading and saving, conversion, parallelising) looks it up with
:func:`family_of` from the model args, so no caller branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mirotrain.models.qwen3.model import Qwen3Args, Qwen3Transformer
from mirotrain.models.qwen3.parallelize import parallelize_qwen3
from mirotrain.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter
from mirotrain.models.qwen3_moe.model import Qwen3MoeTransformer
from mirotrain.models.qwen3_moe.parallelize import parallelize_qwen3_moe
from mirotrain.models.qwen3_moe.state_dict_adapter import Qwen3MoeStateDictAdapter
from mirotrain.models.state_dict_adapter import StateDictAdapter
from mirotrain.parallel.mesh import ParallelMeshes
from mirotrain.parallel.options import ParallelizeOptions


@dataclass(frozen=True)
class ModelFamily:
    """What the engine needs to know about one model family."""

    model_type: str
    model_cls: type[Qwen3Transformer]
    adapter: StateDictAdapter
    parallelize: Callable[[nn.Module, ParallelMeshes, ParallelizeOptions], nn.Module]


FAMILIES: dict[str, ModelFamily] = {
    "qwen3": ModelFamily("qwen3", Qwen3Transformer, Qwen3StateDictAdapter(), parallelize_qwen3),
    "qwen3_moe": ModelFamily("qwen3_moe", Qwen3MoeTransformer, Qwen3MoeStateDictAdapter(), parallelize_qwen3_moe),
}


def family_of(args: Qwen3Args) -> ModelFamily:
    """The family of a model with ``args`` (dense or MoE)."""
    return FAMILIES[args.model_type]


def build_model(args: Qwen3Args, device: str | torch.device = "meta") -> Qwen3Transformer:
    """The model for ``args`` on ``device`` (``meta`` builds without allocating)."""
    with torch.device(device):
        return family_of(args).model_cls(args)
