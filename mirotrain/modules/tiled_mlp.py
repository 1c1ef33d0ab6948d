"""SwiGLU MLP computed over slices of its hidden width, with nothing but its inputs kept for backward.

Why: the plain MLP (:class:`~mirotrain.modules.mlp.FeedForward`, ``w2(silu(w1(x)) * w3(x))``) run under
autograd keeps 4 values of the hidden width F per token for backward (the gate ``g``, ``silu(g)``, the up
projection ``u`` and their product ``h``), i.e. ``4·F·c`` bytes per token in the compute dtype of ``c``
bytes, and backward then holds about ``3·F·c`` more of transient gradients (``dh``, ``du``, ``dg``). With
activation checkpointing the layer being recomputed holds all of this at once: for a 32B Qwen3 (D 5120,
F 25600) at 40K tokens in bf16 that is ``7·25600·2`` = 358 KB per token, ~13.7 GiB for the one layer, the
biggest part of its memory.

:func:`tiled_swiglu` keeps only ``x`` and the weights. Forward computes ``g``, ``u``, ``h`` one slice of
F at a time and frees them before the next slice, summing the slices' down projections into an
accumulator of ``x.shape[:-1] + (D,)`` in fp32 (for half-precision inputs; fp32/fp64 inputs accumulate in
their own dtype). Backward recomputes each slice's ``g``, ``u``, ``silu(g)``, ``h`` and writes that
slice's rows of ``dw1``/``dw3`` and columns of ``dw2`` exactly (each weight gradient entry depends on one
slice only), summing ``dx`` over slices in fp32. Peak: at most 5 slice-sized tensors in backward, about
``5·F/tiles·c`` bytes per token, plus ``4·D`` for the fp32 accumulator. Measured on one H200 (D 5120,
F 25600, 40K tokens, bf16, forward + backward): 12.0 GiB above the inputs for the plain MLP, 3.5 GiB at
8 tiles (both counting the output and the four gradients, 1.5 GiB; measured before backward's in-place
``dh * u``, which frees two more slices), 146 vs 203 ms.

Cost: each slice's gate/up/product is recomputed in backward, one extra MLP forward per step on top of
activation checkpointing's recompute (which re-runs this forward, itself not saving anything), and the
matmuls are ``tiles`` times narrower. Each slice's partial down projection (forward) and partial ``dx``
(backward) is rounded to the compute dtype before the fp32 sum, where the plain MLP rounds the full sum
once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _slice_bounds(hidden: int, tiles: int) -> list[tuple[int, int]]:
    """``tiles`` contiguous slices of ``range(hidden)``, of sizes differing by at most one."""
    edges = [hidden * i // tiles for i in range(tiles + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("mirotrain::tiled_swiglu", mutates_args=())
def _tiled_forward(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, tiles: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.zeros(x2.shape[0], w2.shape[0], dtype=_accumulator_dtype(x.dtype), device=x.device)
    for a, b in _slice_bounds(w1.shape[0], tiles):
        h = F.silu(F.linear(x2, w1[a:b]))
        h.mul_(F.linear(x2, w3[a:b]))
        out += F.linear(h, w2[:, a:b])
        del h
    return out.to(x.dtype).reshape(*x.shape[:-1], w2.shape[0])


@_tiled_forward.register_fake
def _(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, tiles: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w2.shape[0])


@torch.library.custom_op("mirotrain::tiled_swiglu_backward", mutates_args=())
def _tiled_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                    tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = torch.zeros_like(x2, dtype=_accumulator_dtype(x.dtype))
    dw1, dw3, dw2 = w1.new_empty(w1.shape), w3.new_empty(w3.shape), w2.new_empty(w2.shape)
    for a, b in _slice_bounds(w1.shape[0], tiles):
        g = F.linear(x2, w1[a:b])
        u = F.linear(x2, w3[a:b])
        sg = F.silu(g)
        dw2[:, a:b] = dy2.t() @ (sg * u)
        dh = dy2 @ w2[:, a:b]
        du = dh * sg
        del sg
        dg = torch.ops.aten.silu_backward(u.mul_(dh), g)  # d(silu(g) * u)/dg; u's storage is free by now
        del g, u, dh
        dw1[a:b] = dg.t() @ x2
        dw3[a:b] = du.t() @ x2
        dx += dg @ w1[a:b]
        dx += du @ w3[a:b]
    return dx.to(x.dtype).reshape(x.shape), dw1, dw3, dw2


@_tiled_backward.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
      tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # contiguous, as the real op returns them (a reshape of fresh buffers), whatever the inputs' strides
    return x.new_empty(x.shape), w1.new_empty(w1.shape), w3.new_empty(w3.shape), w2.new_empty(w2.shape)


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, w1, w3, w2, tiles = inputs
    ctx.save_for_backward(x, w1, w3, w2)
    ctx.tiles = tiles


def _backward(ctx, dy: torch.Tensor) -> tuple:
    return (*_tiled_backward(dy, *ctx.saved_tensors, ctx.tiles), None)


_tiled_forward.register_autograd(_backward, setup_context=_setup_context)


def tiled_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, tiles: int) -> torch.Tensor:
    """``w2(silu(w1(x)) * w3(x))`` over ``tiles`` slices of the hidden width, keeping no activation for backward.

    ``x``: ``[..., D]``; ``w1``, ``w3``: ``[F, D]``; ``w2``: ``[D, F]`` (``nn.Linear`` weights, no bias).
    Forward and backward are custom ops (``mirotrain::tiled_swiglu``, ``mirotrain::tiled_swiglu_backward``), so
    ``torch.compile`` keeps them in the graph of an enclosing layer, also inside activation checkpointing, where
    a graph break would leave the whole checkpointed layer uncompiled; their time is the matmuls inside.
    """
    hidden = w1.shape[0]
    if not 1 <= tiles <= hidden:
        raise ValueError(f"tiles must be between 1 and the MLP hidden width {hidden}, got {tiles}")
    return _tiled_forward(x, w1, w3, w2, tiles)
