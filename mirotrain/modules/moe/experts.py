"""E SwiGLU experts as stacked weights, applied to tokens already grouped by expert.

Expert e computes  y = W2_e (silu(W1_e x) * W3_e x)  with the weights in Hugging Face orientation
(``[E, out, in]``: ``w1``/``w3`` = ``gate_proj``/``up_proj`` [E, I, D], ``w2`` = ``down_proj`` [E, D, I]),
so checkpoint conversion is a plain stack/unstack along dim 0 (and an EP shard is a row range).

Input rows are sorted by expert: the first ``counts[0]`` rows go to expert 0, and so on. Backends:

- ``grouped_mm``: ``torch._grouped_mm`` with int32 cumulative offsets; one kernel per projection, no host
  sync. CPU kernel since torch 2.9 (fp32/bf16); CUDA fast path (CUTLASS, SM90+) in bf16. Row strides of
  both operands must be multiples of 16 bytes (D and I multiples of 8 in bf16, 4 in fp32).
- ``grouped_gemm``: the ``grouped_gemm`` package (CUDA, bf16), imported only when chosen.
- ``loop``: one matmul per expert (host sync on the counts); the numerical reference.

When a rank holds expert-parallel shards the weights are DTensors sharded on dim 0; compute uses the
local rows (``counts`` then covers the local experts only).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("grouped_mm", "grouped_gemm", "loop")


def _local(w: torch.Tensor) -> torch.Tensor:
    """The rows of ``w`` this rank holds (an expert-parallel DTensor) or ``w`` itself."""
    to_local = getattr(w, "to_local", None)
    return to_local() if to_local is not None else w


@torch.no_grad()
def copy_rows_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the part of ``full`` (the unsharded value) that ``param`` holds (plain tensor or DTensor)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank slices its own part of its own copy, no communication
        part = distribute_tensor(full.to(param.to_local().device, param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full.to(param.device, param.dtype))


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"moe_backend must be one of {BACKENDS}, got {name!r}")
    if name == "grouped_gemm" and importlib.util.find_spec("grouped_gemm") is None:
        raise ValueError("moe_backend='grouped_gemm' needs the grouped_gemm package (pip install 'mirotrain[gemm]'); "
                         "use moe_backend='grouped_mm' instead")
    return name


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] (rows grouped), w [G, out, in] -> [M, out]."""
    w = w.to(x.dtype)
    for n in (x.shape[-1], w.shape[-2]):
        if (n * x.element_size()) % 16:
            raise ValueError(f"moe_backend='grouped_mm' needs expert dims whose rows are multiples of 16 bytes "
                             f"(got {n} x {x.element_size()} bytes); use moe_backend='loop' for such shapes")
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)


@functools.lru_cache(maxsize=1)
def _gmm():
    from grouped_gemm.ops import gmm

    return gmm


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden_dim: int, backend: str = "grouped_mm"):
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.backend = check_backend(backend)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # gate_proj
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # up_proj
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # down_proj

    def init_weights(self, std: float, generator: torch.Generator) -> None:
        """normal(0, std); the full [E, ...] tensor is drawn on every rank, so EP shards match EP=1."""
        for w in (self.w1, self.w3, self.w2):
            copy_rows_into(w, torch.empty(w.shape, device=generator.device).normal_(0.0, std, generator=generator))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [M, D] grouped by (local) expert; counts: [E_local] int (device) -> [M, D]."""
        w1, w3, w2 = _local(self.w1), _local(self.w3), _local(self.w2)
        if counts.numel() != w1.shape[0]:
            raise ValueError(f"{counts.numel()} token counts for {w1.shape[0]} local experts")
        if self.backend == "loop":
            return self._loop(x, counts, w1, w3, w2)
        if self.backend == "grouped_gemm":
            gmm, sizes = _gmm(), counts.to("cpu", torch.int64)  # the package wants host-side sizes
            w1, w3, w2 = (w.to(x.dtype) for w in (w1, w3, w2))
            h = F.silu(gmm(x, w1, sizes, trans_b=True)) * gmm(x, w3, sizes, trans_b=True)
            return gmm(h, w2, sizes, trans_b=True)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(_grouped_mm(x, w1, offsets)) * _grouped_mm(x, w3, offsets)
        return _grouped_mm(h, w2, offsets)

    @staticmethod
    def _loop(x, counts, w1, w3, w2) -> torch.Tensor:
        outs = []
        for e, chunk in enumerate(x.split(counts.tolist())):  # host sync: reference path
            if chunk.shape[0]:
                outs.append(F.linear(F.silu(F.linear(chunk, w1[e])) * F.linear(chunk, w3[e]), w2[e]))
        if not outs:  # keep the weights in the graph so every rank produces (zero) gradients for them
            return x.new_zeros(x.shape) + 0.0 * (w1.sum() + w3.sum() + w2.sum()).to(x.dtype)
        return torch.cat(outs)
