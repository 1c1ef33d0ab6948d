"""FP8 training (config keys ``enable_fp8_training``, ``fp8_recipe_name``), applied from outside the model.

Every ``nn.Linear`` of the decoder layers (attention q/k/v/o, dense MLP gate/up/down) becomes torchao's
``Float8Linear``: its matmuls run as float8 GEMMs (``torch._scaled_mm``) with dynamic scales (e4m3 for
inputs and weights, e5m2 for output gradients), while the parameter stays the same bf16/fp32 tensor under
the same name. So FQNs, DCP step checkpoints and HF exports are those of the bf16 model. Left in bf16: the
embedding, the LM head (its logits feed the loss, where fp8's 3 mantissa bits cost most), the norms, the MoE
router (a parameter, not a Linear) and the MoE experts (grouped parameters run by ``torch._grouped_mm``).

Recipes are torchao's (the names MiroTrain passed to ``Float8LinearConfig.from_recipe_name``):

* ``tensorwise`` (default): one scale per tensor. Under FSDP2 the weights are all-gathered already in fp8
  (half the all-gather bytes); their scales are computed for all layers at once after each optimizer step
  (:func:`attach_scale_precompute`).
* ``rowwise``: one scale per row (more accurate, slower GEMMs); weights are gathered in bf16.
* ``rowwise_with_gw_hp``: rowwise, with the weight gradient's GEMM in bf16.

torchao is imported only when FP8 is on (the ``gpu`` extra installs it), so bf16 runs never load it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from mirotrain.config.schema import FP8_RECIPES

log = logging.getLogger(__name__)

DEFAULT_RECIPE = "tensorwise"
# torch._scaled_mm wants both GEMM dims divisible by 16; a Linear with another shape stays in bf16.
FP8_DIM_MULTIPLE = 16
# float8 GEMMs (torch._scaled_mm with e4m3/e5m2) exist from Ada / Hopper on.
MIN_CAPABILITY = (8, 9)


def recipe_of(name: str | None) -> str:
    """The recipe ``fp8_recipe_name`` names (null: ``tensorwise``)."""
    return DEFAULT_RECIPE if name is None else name


def fp8_device_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot run FP8 training (None: it can)."""
    if device.type != "cuda":
        return f"needs a CUDA GPU with float8 matmuls (compute capability >= 8.9), the run is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"needs float8 matmuls (compute capability >= 8.9: Ada, Hopper or newer); {name} has "
                f"{major}.{minor}")
    return None


def is_fp8_linear(module: nn.Module, fqn: str) -> bool:
    """Whether ``module`` (at ``fqn``) becomes a float8 Linear: a Linear inside a decoder layer whose GEMM dims
    ``torch._scaled_mm`` takes."""
    return (type(module) is nn.Linear and fqn.startswith("layers.")
            and module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0)


def float8_config(recipe: str, *, sharded: bool, emulate: bool = False) -> Any:
    """torchao's ``Float8LinearConfig`` for ``recipe``; ``sharded`` (FSDP over several ranks) turns on the
    fp8 weight all-gather where the recipe allows it (tensorwise). ``emulate`` runs the casts and a
    float matmul instead of ``_scaled_mm`` (no FP8 hardware: CPU tests)."""
    from torchao.float8 import Float8LinearConfig

    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe_name: {recipe!r} is not a recipe ({', '.join(FP8_RECIPES)})")
    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=sharded and recipe == "tensorwise",
                               emulate=emulate)


def apply_float8_training(model: nn.Module, recipe: str, *, sharded: bool, emulate: bool = False) -> list[str]:
    """Swap the decoder layers' Linears for torchao's ``Float8Linear`` in place (before FSDP, on a meta model
    too); returns the FQNs converted. Parameters keep their names, dtypes and state-dict keys."""
    from torchao.float8 import convert_to_float8_training

    converted: list[str] = []

    def select(module: nn.Module, fqn: str) -> bool:
        if is_fp8_linear(module, fqn):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=select,
                               config=float8_config(recipe, sharded=sharded, emulate=emulate))
    if not converted:
        raise ValueError("enable_fp8_training: no decoder-layer Linear has dims divisible by "
                         f"{FP8_DIM_MULTIPLE}; nothing would run in fp8")
    log.info("FP8 training (%s): %d Linears of the decoder layers run float8 matmuls; the embedding, LM head, "
             "norms and any MoE router and experts keep the compute dtype", recipe, len(converted))
    return converted


def attach_scale_precompute(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After each optimizer step, compute the fp8 scales of every FSDP-sharded float8 weight in one
    all-reduce (torchao's ``precompute_float8_dynamic_scale_for_fsdp``), instead of one per layer during the
    next forward's all-gathers. Only weights gathered in fp8 (tensorwise recipe) have such scales; for others
    it does nothing."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))
