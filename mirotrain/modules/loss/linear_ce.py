"""Chunked linear cross-entropy: LM head + CE without materialising [tokens, vocab] logits.

Why a custom autograd function: a plain chunked loss (``for chunk: F.cross_entropy(h_c @ W.T)``) still
keeps every chunk's fp32 logits alive for backward, which at 16K tokens × 152K vocab is ~10 GB. Here each
chunk's gradient is computed in the forward pass (softmax − one-hot, then the two matmuls), so only the
gradients w.r.t. the hidden states [N, D] and the weight [V, D] are kept until backward; peak extra memory is
one chunk of logits.

The loss returns the *sum* of token losses and the number of trained tokens; the trainer divides by the
trained-token count over all data-parallel ranks and accumulation steps (token-level normalisation).
Ignored positions (label == ignore_index) are removed before the projection, so prompt tokens cost no
vocabulary work.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

DEFAULT_CHUNK_TOKENS = 4096


def _chunk_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk: (sum of CE over its tokens [fp32], d/dhidden, d/dweight [fp32]) (fp64 for fp64 inputs).

    hidden [n, D], weight [V, D] (same dtype, the compute dtype), targets [n] long (all valid).
    Logits are formed in fp32 from the compute-dtype matmul so softmax and log-sum-exp are exact in fp32.
    """
    logits = hidden @ weight.t()  # [n, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
    lse = torch.logsumexp(logits, dim=-1)
    rows = torch.arange(targets.shape[0], device=targets.device)
    target_logit = logits[rows, targets]
    loss_sum = (lse - target_logit).sum()
    if not need_grad:
        return loss_sum, None, None
    # d(lse - z_t)/dz = softmax(z) - onehot(t), formed in place in the logits buffer (no second [n, V] tensor)
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits[rows, targets] -= 1.0
    grad_logits = grad_logits.to(hidden.dtype)
    grad_hidden = grad_logits @ weight
    grad_weight = (grad_logits.t() @ hidden).to(logits.dtype)
    return loss_sum, grad_hidden, grad_weight


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """sum_t CE(hidden_t @ weight.T, target_t) over pre-selected valid tokens, chunked over tokens."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                chunk_fn: Callable) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, hidden.shape[0])
            loss_c, gh, gw = chunk_fn(hidden[start:stop], weight, targets[start:stop], need_grad)
            total = total + loss_c
            if need_grad:
                grad_hidden[start:stop] = gh
                grad_weight += gw
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_output.to(grad_hidden.dtype)
        dh = grad_hidden * g if ctx.needs_input_grad[0] else None
        dw = grad_weight * g if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def select_targets(labels: torch.Tensor, ignore_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions of trained tokens, their labels), both on ``device``.

    Computed where ``labels`` lives: from CPU labels (the loader's) this is host work and the copy to the GPU
    is non-blocking, so selecting the tokens costs no device->host sync.
    """
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    targets = flat[index]
    if index.device != device:
        index = index.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
    return index, targets


class LinearCrossEntropyLoss(nn.Module):
    """Fused LM head + cross-entropy over the trained tokens, chunked; returns ``(loss_sum, n_tokens)``.

    Args:
        num_output_chunks: accepted for torchtune compatibility; chunking here is by tokens
            (``chunk_tokens``), which bounds memory independently of the sequence length.
        ignore_index: label value of untrained positions.
        chunk_tokens: tokens per chunk (peak extra memory ≈ chunk_tokens × vocab × 4 bytes × 2).
        tp_enabled: accepted for compatibility (tensor parallelism is not supported).
    """

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 tp_enabled: bool = False):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if tp_enabled:
            raise ValueError("LinearCrossEntropyLoss: tensor parallelism is not supported (tp_enabled must be False)")
        self.ignore_index = ignore_index
        self.chunk_tokens = chunk_tokens
        self.num_output_chunks = num_output_chunks
        self._chunk_fn: Callable = _chunk_loss_and_grads

    def apply_compile(self) -> None:
        """torch.compile the per-chunk kernel (shapes vary with the number of trained tokens: dynamic)."""
        self._chunk_fn = torch.compile(_chunk_loss_and_grads, dynamic=True)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [..., D] (final normed hidden states), weight [V, D] (LM head), labels [...] (shifted).

        Returns (sum of token losses as fp32 scalar, number of trained tokens as int64 scalar on hidden's
        device). Pass CPU labels to avoid a host sync when hidden is on a GPU.
        """
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        index, targets = select_targets(labels, self.ignore_index, flat_hidden.device)
        selected = flat_hidden.index_select(0, index)
        if selected.dtype != weight.dtype:
            selected = selected.to(weight.dtype)
        loss_sum = _LinearCrossEntropyFunction.apply(selected, weight, targets, self.chunk_tokens, self._chunk_fn)
        count = torch.full((), index.numel(), dtype=torch.long, device=flat_hidden.device)
        return loss_sum, count
