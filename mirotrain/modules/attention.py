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
is ~1.8× FlashAttention-2 (docs/perf-notes.md).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "sdpa")


@functools.lru_cache(maxsize=None)
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=None)
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _varlen_supports_gqa() -> bool:
    fn = _varlen_fn()
    return fn is not None and "enable_gqa" in inspect.signature(fn).parameters


def available_backends(device: torch.device) -> list[str]:
    names = ["sdpa"]
    if device.type == "cuda":
        if _varlen_fn() is not None:
            names.append("varlen")
        if _has_flash_attn():
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
    """[T, T] bool mask: True where query t may attend key s (same document, s <= t)."""
    seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
    doc = torch.repeat_interleave(torch.arange(seqlens.numel(), device=cu_seqlens.device), seqlens.long())
    if doc.numel() < total:  # positions beyond the last document (should not happen) attend only themselves
        tail = torch.arange(doc.numel(), total, device=doc.device) + seqlens.numel()
        doc = torch.cat([doc, tail])
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (doc[:, None] == doc[None, :]) & causal


@functools.lru_cache(maxsize=None)
def _cuda_dense_backends():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _dense_causal_cuda(q, k, v, scale):
    """One causal document per row on CUDA: cuDNN attention when it accepts the inputs, else flash."""
    from torch.nn.attention import sdpa_kernel

    if q.shape[2] != k.shape[2]:  # cuDNN SDPA takes no GQA: expand kv heads (transient, one layer)
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(_cuda_dense_backends(), set_priority=True):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
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
    fn = _varlen_fn()
    q0, k0, v0 = q[0], k[0], v[0]
    kwargs = {}
    if q0.shape[1] != k0.shape[1]:
        if _varlen_supports_gqa():
            kwargs["enable_gqa"] = True
        else:
            rep = q0.shape[1] // k0.shape[1]
            k0, v0 = k0.repeat_interleave(rep, dim=1), v0.repeat_interleave(rep, dim=1)
    out = fn(q0, k0, v0, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0), **kwargs)
    return out.unsqueeze(0)


def _flash(q, k, v, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    out = flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 softmax_scale=scale, causal=True)
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
