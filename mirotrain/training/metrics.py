"""Training throughput, causal MFU and memory, computed without per-step host syncs.

FLOPs per step (forward + backward, causal attention):

    6 · N_matmul · tokens  +  6 · L · H · hd · Σ_docs doc_len²

N_matmul counts the parameters a token multiplies through (attention and MLP projections, the *active*
experts and router of MoE layers, the LM head; not the embedding lookup). A token at position t of its
document attends to t keys: 4·H·hd·t FLOPs forward, ×3 with backward, averaging t ≈ doc_len/2 gives
6·L·H·hd·doc_len per token. Document lengths come from ``cu_seqlens`` of the CPU batch (host arithmetic).
Peak FLOP/s: detected from the GPU name, overridable with the ``mfu_peak_tflops`` config key or
``MIROTRAIN_PEAK_TFLOPS``.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch

from mirotrain.data.batch import SFTBatch

# Dense bf16 peak TFLOP/s (vendor datasheets, without sparsity). Order matters: first match wins.
_PEAK_BF16_TFLOPS = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("H20", 148.0),
    ("B200", 2250.0), ("GB200", 2500.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 125.0),
)


def matmul_params(args: Any) -> int:
    """Parameters multiplied per token (see module docstring); ``args`` is a Qwen3Args."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    dense_mlp = 3 * args.dim * args.hidden_dim
    total = args.vocab_size * args.dim  # LM head
    for layer in range(args.n_layers):
        total += attn
        moe_layer = (args.num_experts > 0 and layer not in set(args.mlp_only_layers)
                     and (layer + 1) % max(1, args.decoder_sparse_step) == 0)
        if moe_layer:
            total += args.num_experts_per_tok * 3 * args.dim * args.moe_hidden_dim + args.dim * args.num_experts
        else:
            total += dense_mlp
    return total


def step_flops(args: Any, n_matmul: int, batch: SFTBatch) -> float:
    """Forward + backward FLOPs of one micro-batch (host arithmetic on the CPU batch)."""
    tokens = batch.input_ids.numel()
    attn = 6.0 * args.n_layers * args.n_heads * args.head_dim * sum(n * n for n in batch.doc_lengths())
    return 6.0 * n_matmul * tokens + attn


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU, or None when unknown (CPU without a configured value)."""
    value = configured_tflops
    if value is None and os.environ.get("MIROTRAIN_PEAK_TFLOPS"):
        value = float(os.environ["MIROTRAIN_PEAK_TFLOPS"])
    if value is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_BF16_TFLOPS:
            if key in name:
                value = tflops if dtype == torch.bfloat16 else tflops / 2  # fp32 runs use TF32
                break
    return None if value is None else value * 1e12


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory since the last reset, in GiB (allocator statistics: no device sync)."""
    gib = 1024 ** 3
    if device.type == "cuda":
        return {"peak_mem_alloc_gib": torch.cuda.max_memory_allocated(device) / gib,
                "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"peak_rss_gib": rss_kib * scale / gib}
