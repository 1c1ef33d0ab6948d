"""Attention kernels on the GPU for Qwen3 head shapes: one 16K document and a packed 16K row.

Prints ms and TFLOP/s (causal FLOPs, forward + backward = 3.5 × forward... counted as 2·2·T²·H·hd/2 × 3.5)
for each backend our `attention()` can use, so docs/perf-notes.md can cite measured numbers; and two
candidates for packed rows not yet in the engine (issue 20's packed-row MFU): cuDNN's varlen kernel
(``aten._cudnn_attention_forward`` with cumulative sequence lengths, the op PyTorch's nested-tensor SDPA uses)
and one dense cuDNN call per document, each with its largest difference from the varlen kernel's output and
query gradient.
Usage: python benchmarks/attention.py [--seq 16384]
"""

from __future__ import annotations

import argparse
import json

import torch

from mirotrain.modules.attention import _dense_causal_cuda, _sdpa, _varlen, available_backends


def bench(fn, *args, iters: int = 10) -> float:
    for _ in range(3):
        out = fn(*args)
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        out = fn(*args)
        out.backward(torch.ones_like(out))
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def cudnn_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    """Packed causal attention through cuDNN's varlen kernel: [1, T, H, D] in, kv heads expanded (no GQA)."""
    q0, k0, v0 = q[0], k[0], v[0]
    rep = q0.shape[1] // k0.shape[1]
    k0, v0 = k0.repeat_interleave(rep, dim=1), v0.repeat_interleave(rep, dim=1)
    out = torch.ops.aten._cudnn_attention_forward(q0, k0, v0, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                  True, 0.0, True, False, scale=scale)[0]
    return out.unsqueeze(0)


def cudnn_per_document(q, k, v, lengths, scale):
    """Packed causal attention as one dense cuDNN call per document (host-side lengths)."""
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    return torch.cat([_dense_causal_cuda(q[:, a:b], k[:, a:b], v[:, a:b], scale)
                      for a, b in zip(bounds[:-1], bounds[1:])], dim=1)


def difference(fn, reference, q) -> dict:
    """Largest absolute difference of ``fn(q)``'s output and of q's gradient from ``reference(q)``'s."""
    results = []
    for f in (fn, reference):
        q.grad = None
        out = f(q)
        out.backward(torch.ones_like(out))
        results.append((out.detach().float(), q.grad.float().clone()))
    (o1, g1), (o2, g2) = results
    return dict(out_max_abs=float((o1 - o2).abs().max()), dq_max_abs=float((g1 - g2).abs().max()),
                dq_ref_max=float(g2.abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=16384)
    ns = parser.parse_args()
    dev = torch.device("cuda")
    T, H, KV, D = ns.seq, 32, 8, 128
    q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, T, KV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, T, KV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    scale = D**-0.5
    single = torch.tensor([0, T], dtype=torch.int32, device=dev)
    torch.manual_seed(0)
    lengths = torch.distributions.LogNormal(7.6, 0.9).sample((64,)).clamp(64, T).long().tolist()
    packed, total = [], 0
    for n in lengths:
        if total + n > T:
            break
        packed.append(n)
        total += n
    packed.append(T - total)
    cu_packed = torch.tensor([0] + torch.tensor(packed).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    max_packed = max(packed)
    doc_flops = sum(4 * n * n / 2 * H * D for n in packed) * 3.5
    full_flops = 4 * T * T / 2 * H * D * 3.5
    rows = []
    cases = [("cudnn dense (1 doc)", lambda: bench(_dense_causal_cuda, q, k, v, scale), full_flops),
             ("sdpa causal flash (1 doc)", lambda: bench(lambda *a: _sdpa(*a), q, k, v, None, scale), full_flops)]
    if "varlen" in available_backends(dev):
        cases += [("varlen (1 doc)", lambda: bench(_varlen, q, k, v, single, T, scale), full_flops),
                  (f"varlen (packed, {len(packed)} docs)", lambda: bench(_varlen, q, k, v, cu_packed, max_packed, scale), doc_flops)]
        cases += [(f"cudnn varlen (packed, {len(packed)} docs)",
                   lambda: bench(cudnn_varlen, q, k, v, cu_packed, max_packed, scale), doc_flops),
                  (f"cudnn per document (packed, {len(packed)} docs)",
                   lambda: bench(cudnn_per_document, q, k, v, packed, scale), doc_flops)]
    for name, run, flops in cases:
        try:
            ms = run()
            rows.append(dict(case=name, ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1)))
        except Exception as exc:  # report, keep going: this is a survey of kernels
            rows.append(dict(case=name, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
        print(json.dumps(rows[-1]), flush=True)
    if "varlen" in available_backends(dev):
        def reference(q_):
            return _varlen(q_, k, v, cu_packed, max_packed, scale)

        for name, fn in (("cudnn varlen", lambda q_: cudnn_varlen(q_, k, v, cu_packed, max_packed, scale)),
                         ("cudnn per document", lambda q_: cudnn_per_document(q_, k, v, packed, scale))):
            try:
                print(json.dumps(dict(check=f"{name} vs varlen (packed)", **difference(fn, reference, q))),
                      flush=True)
            except Exception as exc:
                print(json.dumps(dict(check=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")), flush=True)


if __name__ == "__main__":
    main()
