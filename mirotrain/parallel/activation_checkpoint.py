"""Activation checkpointing (AC) of decoder layers, applied from outside the model.

A family's ``parallelize`` (``models/qwen3/parallelize.py``) applies it after sequence and expert parallelism
and before compile, so recomputation is part of the compiled region.

Modes:
  ``full``       recompute every decoder layer in backward (keeps only layer inputs).
  ``selective``  with an int option N: checkpoint every N-th layer; with option ``op``: per-operator policy that
                 keeps matmul and attention outputs and recomputes the cheap element-wise ops; with option
                 ``attention``: keeps only the attention outputs (recompute skips the attention forward).
  ``auto``       decided per layer from the memory estimate against the GPU (mirotrain/commands/estimate.py:
                 ``memory_plan``): applied as option ``(keep, op, attention)``, layer counts in that order, the
                 first ``keep`` layers keep all their activations, the next ``op`` are selective ``op``, the next
                 ``attention`` selective ``attention``, the rest recomputed in full (``layer_levels``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("full", "selective", "none", "auto")
# What one decoder layer keeps for its backward, from the most memory (and the least recompute) to the least:
# everything, the selective options' saved outputs, its input only.
LEVELS = ("none", "op", "attention", "full")

# The attention forwards, by qualified name, so that packages not imported (flash-attn) need not be: SDPA's
# kernels (cuDNN for one document on GPUs, flash on the CPU), torch's varlen custom op and flash-attn's custom ops
# (packed rows: mirotrain/modules/attention.py).
_ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "torch_attn::_varlen_attn",
    "flash_attn::_flash_attn_varlen_forward",
    "flash_attn::_flash_attn_forward",
})
# Outputs kept under per-op selective AC: the expensive ones to recompute. ``op`` keeps matmul and attention
# outputs (fast, memory-hungry; FP8 Linears call aten::mm on float8 tensors, which this policy sees before their
# subclass turns it into a scaled matmul); ``attention`` keeps only attention outputs (T·H·hd per layer):
# recompute skips the attention forward, the costliest op at long context, for ~1/10 of the memory of ``op``.
_SAVE_OPS = {
    "op": _ATTENTION_OPS | {"aten::mm", "aten::addmm", "aten::bmm"},
    "attention": _ATTENTION_OPS,
}


def _policy(saved: frozenset, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    name = op.name() if isinstance(op, torch._ops.OpOverload) else None
    return CheckpointPolicy.MUST_SAVE if name in saved else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint(layer: nn.Module, save: str | None) -> nn.Module:
    if save is not None:
        context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, _SAVE_OPS[save]))
        return checkpoint_wrapper(layer, context_fn=context_fn, preserve_rng_state=False)
    return checkpoint_wrapper(layer, preserve_rng_state=False)


def resolve_ac(enabled: bool, mode: str | None, option: int | str | None) -> tuple[str, int | str | None]:
    """(mode, option) from the MiroTrain keys: ``enable_activation_checkpointing`` wins; ``ac_mode`` refines.
    ``auto`` comes back as it is, for the memory plan to decide."""
    if not enabled and mode in (None, "none"):
        return "none", None
    mode = mode or "full"
    if mode not in AC_MODES:
        raise ValueError(f"ac_mode must be one of {AC_MODES}, got {mode!r}")
    if mode == "selective":
        if option is None:
            option = "op"
        if not (option in _SAVE_OPS or (isinstance(option, int) and option >= 1)):
            raise ValueError(f"ac_option for selective AC must be one of {sorted(_SAVE_OPS)} or a positive int, "
                             f"got {option!r}")
    return mode, option


def layer_levels(mode: str, option: int | str | tuple[int, int, int] | None, n_layers: int) -> list[str]:
    """The ``LEVELS`` entry of each decoder layer under ``mode``/``option`` as ``resolve_ac`` returns them
    (``auto`` decided: option ``(keep, op, attention)``, see the module docstring). The memory estimate counts
    each layer by it (mirotrain/commands/step_memory.py), so it and the wrapping below cannot disagree."""
    if mode in ("none", "full"):
        return [mode] * n_layers
    if mode == "auto":
        keep, op, attention = option
        if min(option) < 0 or keep + op + attention > n_layers:
            raise ValueError(f"ac_mode auto's layer counts (keep, op, attention) = {option} do not fit {n_layers} "
                             "layers")
        return ["none"] * keep + ["op"] * op + ["attention"] * attention + ["full"] * (n_layers - keep - op - attention)
    if option in _SAVE_OPS:
        return [option] * n_layers
    return ["full" if i % int(option) == 0 else "none" for i in range(n_layers)]


def apply_activation_checkpointing(model: nn.Module, mode: str,
                                   option: int | str | tuple[int, int, int] | None = None) -> None:
    """Wrap decoder layers of ``model.layers`` in place according to ``mode``/``option`` (``layer_levels``)."""
    for i, level in enumerate(layer_levels(mode, option, len(model.layers))):
        if level != "none":
            model.layers[i] = _checkpoint(model.layers[i], save=None if level == "full" else level)
