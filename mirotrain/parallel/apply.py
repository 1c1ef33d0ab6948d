"""Apply training-time wrappers to a single-device model, from the outside, in a fixed order:

    activation checkpointing -> torch.compile -> FSDP

AC must wrap the layer before compile traces it (so recomputation is part of the compiled region), and FSDP
goes last so its hooks see the final modules. The model code itself knows nothing of any of this.

Activation checkpointing modes:
  ``full``       recompute every decoder layer in backward (keeps only layer inputs).
  ``selective``  with an int option N: checkpoint every N-th layer; with option ``op``: per-operator policy that
                 keeps matmul and attention outputs and recomputes the cheap element-wise ops; with option
                 ``attention``: keeps only the attention outputs (recompute skips the attention forward).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("full", "selective", "none")

_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
# Outputs kept under per-op selective AC: the expensive ones to recompute. ``op`` keeps matmul and attention
# outputs (fast, memory-hungry); ``attention`` keeps only attention outputs (T·H·hd per layer): recompute skips
# the attention forward, the costliest op at long context, for ~1/20 of the memory of ``op``.
_SAVE_OPS = {
    "op": _ATTENTION_OPS | {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default},
    "attention": _ATTENTION_OPS,
}


def _policy(saved: set, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint(layer: nn.Module, save: str | None) -> nn.Module:
    if save is not None:
        context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, _SAVE_OPS[save]))
        return checkpoint_wrapper(layer, context_fn=context_fn, preserve_rng_state=False)
    return checkpoint_wrapper(layer, preserve_rng_state=False)


def resolve_ac(enabled: bool, mode: str | None, option: int | str | None) -> tuple[str, int | str | None]:
    """(mode, option) from the MiroTrain keys: ``enable_activation_checkpointing`` wins; ``ac_mode`` refines."""
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


def apply_activation_checkpointing(model: nn.Module, mode: str, option: int | str | None = None) -> None:
    """Wrap decoder layers of ``model.layers`` in place according to ``mode``/``option``."""
    if mode == "none":
        return
    for i, layer in enumerate(list(model.layers)):
        if mode == "full":
            wrapped = _checkpoint(layer, save=None)
        elif option in _SAVE_OPS:
            wrapped = _checkpoint(layer, save=option)
        elif i % int(option) == 0:
            wrapped = _checkpoint(layer, save=None)
        else:
            continue
        model.layers[i] = wrapped


def apply_compile(model: nn.Module, loss_fn: nn.Module | None = None) -> None:
    """torch.compile each decoder layer's forward (FQNs unchanged) and the loss's per-chunk kernel.

    Only ``forward`` is compiled, not ``__call__``: the module hooks FSDP installs afterwards run eagerly around
    the compiled region (as with torchtitan's compile-then-shard order), whatever dynamo's FSDP-hook settings.
    """
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, fullgraph=False)
    if loss_fn is not None and hasattr(loss_fn, "apply_compile"):
        loss_fn.apply_compile()


def parallelize(model: nn.Module, mesh: Any, *, ac_mode: str = "none", ac_option: int | str | None = None,
                compile_model: bool = False, loss_fn: nn.Module | None = None,
                param_dtype: torch.dtype = torch.bfloat16, cpu_offload: bool = False,
                reshard_after_forward: bool = True, gradient_divide_factor: float | None = None,
                expert_mesh: Any = None) -> nn.Module:
    """AC -> compile -> FSDP on a meta-device model (nothing is allocated here).

    Sequence and expert parallelism (mirotrain.parallel.ulysses / expert_parallel) are applied before this,
    on the single-device model, because they only swap the attention kernel / shard expert weights.
    """
    from mirotrain.parallel.fsdp import apply_fsdp

    apply_activation_checkpointing(model, ac_mode, ac_option)
    if compile_model:
        apply_compile(model, loss_fn)
    return apply_fsdp(model, mesh, param_dtype=param_dtype, cpu_offload=cpu_offload,
                      reshard_after_forward=reshard_after_forward, gradient_divide_factor=gradient_divide_factor,
                      expert_mesh=expert_mesh)
