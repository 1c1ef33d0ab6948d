"""Row permutations of the MoE dispatch whose backward is a gather, not a scatter.

Routing reorders rows three times per layer: token rows to their k slot copies in expert order, (with expert
parallelism) received chunks to expert-major order, and expert outputs back. Written as ``x[idx]`` and
``empty_like(y).index_copy(0, idx, y)``, autograd's backward of the gather is an ``index_put`` with
accumulation (a sort of all N*k indices on CUDA, or atomics) and ``index_copy`` saves its whole source (an
[N*k, D] tensor per layer: docs/moe.md, "What validate's estimate leaves out for MoE"), although a permutation
is undone by gathering with its inverse. These functions save only the int64 indices:

    permute_rows(x, index, inverse)   y = x[index]          grad_x = grad_y[inverse]
    expand_rows(x, order, inverse, k) y = x[order // k]     grad_x[t] = sum_j grad_y[inverse[t*k + j]]

``index`` and ``order`` are permutations of the rows and ``inverse`` their inverse (``inverse_permutation``).
The forward values are those of the indexing they replace, bit for bit; the gradient of ``expand_rows`` sums
a token's k slot gradients in slot order (one reduction, fp32 accumulation in bf16) where ``index_put`` added
them one at a time in expert order, so it can differ from it in the last bits.
"""

from __future__ import annotations

import torch


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """inv with inv[index[i]] = i (no host sync)."""
    return torch.empty_like(index).scatter_(0, index, torch.arange(index.numel(), device=index.device))


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _ExpandRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        slots = grad.index_select(0, inverse)  # slot order: row t*k + j is token t's j-th choice
        return slots.view(-1, ctx.k, slots.shape[-1]).sum(dim=1), None, None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[index] for a permutation ``index`` of x's rows, with ``inverse = inverse_permutation(index)``."""
    return _PermuteRows.apply(x, index, inverse)


def expand_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """x[order // k]: the k slot copies of x's N token rows ([N, D] -> [N*k, D]) in the order ``order`` (a
    permutation of the N*k slots, slot s = t*k + j), with ``inverse = inverse_permutation(order)``."""
    return _ExpandRows.apply(x, order, inverse, k)
