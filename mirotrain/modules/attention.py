"""Causal attention over packed rows, behind one function with interchangeable backends.

Every backend computes the same thing: softmax(q kᵀ · scale + causal-and-same-document mask) v, where
a packed row's documents are delimited by ``cu_seqlens``. Backends:

- ``flash``:  flash-attn's varlen kernel (when installed; CUDA).
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA builds of torch >= 2.9).
- ``sdpa``:   ``scaled_dot_product_attention`` with an explicit block-diagonal causal mask (any device;
  the reference and the CPU path). Without ``cu_seqlens`` it is plain causal SDPA, which lets CUDA pick
  its fastest kernel (cuDNN / flash) for rows holding a single document.

``auto`` picks flash > varlen > sdpa for packed rows on CUDA and sdpa otherwise. A row that holds a
single document (``max_seqlen`` equals the row length, known on the host without a sync) needs no
document mask, so on CUDA it goes to dense causal SDPA with cuDNN attention first: on Hopper that kernel
is ~1.8× FlashAttention-2 (docs/perf-notes.md), except under deterministic algorithms
(``cudnn_deterministic_mode``), where flash attention's deterministic backward is used instead.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "sdpa")


def _import_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# Resolved once at import: the forward pass only reads constants, so torch.compile traces it without graph
# breaks (a break inside a checkpointed layer would make dynamo run the whole layer eagerly).
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_VARLEN_ATTN = _import_varlen()
_VARLEN_GQA = _VARLEN_ATTN is not None and "enable_gqa" in inspect.signature(_VARLEN_ATTN).parameters


def available_backends(device: torch.device) -> list[str]:
    names = ["sdpa"]
    if device.type == "cuda":
        if _VARLEN_ATTN is not None:
            names.append("varlen")
        if _HAS_FLASH_ATTN:
            names.append("flash")
    return names


def resolve_backend(name: str, device: torch.device) -> str:
    """Map a configured backend name to one usable on ``device`` (error if explicitly unavailable)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    usable = available_backends(device)
    if name == "auto":
        for candidate in ("flash", "varlen", "sdpa"):
            if candidate in usable:
                return candidate
    if name not in usable:
        raise ValueError(f"attention backend {name!r} is not available on {device.type}; available: {usable}")
    return name


def document_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T, T] bool mask: True where query t may attend key s (same document, s <= t).

    Document ids come from ``searchsorted`` so every shape is known without reading ``cu_seqlens`` (no
    data-dependent shapes: the mask traces under torch.compile). Positions past the last boundary form one
    more segment.
    """
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    doc = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (doc[:, None] == doc[None, :]) & causal


def single_document_kernel(dtype: torch.dtype, head_dim: int) -> str:
    """The kernel of a CUDA row holding one causal document: ``cudnn`` for the Qwen3 shapes (bf16/fp16, head_dim
    64 or 128), else ``sdpa`` (SDPA's own choice). Under deterministic algorithms always ``sdpa``: SDPA then
    skips cuDNN attention, whose backward has no deterministic mode, and runs flash attention with its
    deterministic backward (mirotrain/training/determinism.py)."""
    if torch.are_deterministic_algorithms_enabled():
        return "sdpa"
    return "cudnn" if dtype in (torch.bfloat16, torch.float16) and head_dim in (64, 128) else "sdpa"


def _dense_causal_cuda(q, k, v, scale):
    """One causal document per row on CUDA, with :func:`single_document_kernel`'s kernel. The cuDNN op is called
    directly rather than through ``sdpa_kernel``, a context manager torch.compile does not trace."""
    if single_document_kernel(q.dtype, q.shape[-1]) == "sdpa":
        return _sdpa(q, k, v, None, scale)
    if q.shape[2] != k.shape[2]:  # cuDNN attention takes no GQA: expand kv heads (transient, one layer)
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, q.requires_grad or k.requires_grad or v.requires_grad, 0.0, True, False, scale=scale)[0]
    return out.transpose(1, 2)


def _sdpa(q, k, v, cu_seqlens, scale):
    # SDPA wants [B, H, T, D]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        if q.shape[0] != 1:
            raise ValueError("packed attention (cu_seqlens) needs batch size 1")
        mask = document_causal_mask(cu_seqlens, q.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    fn = _VARLEN_ATTN
    q0, k0, v0 = q[0], k[0], v[0]
    kwargs = {}
    if q0.shape[1] != k0.shape[1]:
        if _VARLEN_GQA:
            kwargs["enable_gqa"] = True
        else:
            rep = q0.shape[1] // k0.shape[1]
            k0, v0 = k0.repeat_interleave(rep, dim=1), v0.repeat_interleave(rep, dim=1)
    out = fn(q0, k0, v0, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0), **kwargs)
    return out.unsqueeze(0)


def _flash(q, k, v, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    # flash-attn's own deterministic backward (flash-attn >= 2.4.1) under deterministic algorithms
    extra = {"deterministic": True} if torch.are_deterministic_algorithms_enabled() else {}
    out = flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 softmax_scale=scale, causal=True, **extra)
    return out.unsqueeze(0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal (per-document) attention. q: [B, T, H, D]; k, v: [B, T, KV, D] -> [B, T, H, D]."""
    name = resolve_backend(backend, q.device)
    single_document = cu_seqlens is None or (max_seqlen is not None and max_seqlen == q.shape[1])
    if q.is_cuda and single_document and name != "sdpa":
        return _dense_causal_cuda(q, k, v, scale)
    if name == "sdpa":
        return _sdpa(q, k, v, None if single_document and cu_seqlens is None else cu_seqlens, scale)
    if q.shape[0] != 1:
        raise ValueError("packed attention (cu_seqlens) needs batch size 1")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())  # host sync: callers should pass it
    if name == "flash":
        return _flash(q, k, v, cu, max_seqlen, scale)
    return _varlen(q, k, v, cu, max_seqlen, scale)
