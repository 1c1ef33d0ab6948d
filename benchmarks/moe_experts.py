"""Expert GEMM backends at Qwen3-30B-A3B shapes: ``torch._grouped_mm`` vs the ``grouped_gemm`` package vs the loop.

One expert-parallel rank's share of one MoE layer, forward + backward of the SwiGLU experts
(:class:`mirotrain.modules.moe.experts.GroupedExperts`, the module training runs), for the rows a rank
receives at a given number of tokens per GPU: ``tokens x top_k`` rows over the rank's ``128 / ep`` experts.
Two routings: balanced (every expert the same rows, like forced load balancing) and skewed (a quarter of
the experts three times the mean, a quarter none: the imbalance random router weights produce).
Each row prints the step time, TFLOP/s (6 x rows x 3 x D x I) and the largest gradient difference from
``grouped_mm`` (both backends must agree to bf16 round-off; tests/gpu/test_moe_backends_gpu.py checks both
against float64).

  pip install benchmarks/wheels/grouped_gemm-*.whl     # GPU image: torch 2.11, CUDA 13, Python 3.12, SM90
  python benchmarks/moe_experts.py [--tokens 4096,16384,40960] [--ep 2] [--json $OUT/moe_experts.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirotrain.modules.moe.experts import GroupedExperts  # noqa: E402

DIM, HIDDEN, EXPERTS, TOP_K = 2048, 768, 128, 8  # Qwen/Qwen3-30B-A3B config.json


def routed_counts(rows: int, experts: int, skewed: bool) -> torch.Tensor:
    """Rows per local expert summing to ``rows``; skewed: a quarter at 3x the mean, a quarter empty."""
    weights = torch.ones(experts)
    if skewed:
        weights[: experts // 4] = 3.0
        weights[experts // 4: experts // 2] = 0.0
    counts = (weights / weights.sum() * rows).floor().long()
    counts[0] += rows - int(counts.sum())
    return counts


def time_backend(module: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, grad: torch.Tensor,
                 iters: int) -> tuple[float, torch.Tensor]:
    """Mean seconds of forward+backward over ``iters`` after 3 warm-up steps; the input gradient."""
    def step() -> torch.Tensor:
        x.grad = None
        module(x, counts).backward(grad)
        return x.grad
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters, x.grad.clone()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="4096,16384,40960", help="tokens per GPU, comma-separated")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size (local experts = 128 / ep)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    local = EXPERTS // args.ep
    backends = ["grouped_mm"] + (["grouped_gemm"] if importlib.util.find_spec("grouped_gemm") else []) + ["loop"]
    rows_out = []
    print(f"{torch.cuda.get_device_name(dev)}; {local} local experts of {DIM}x{HIDDEN}; backends {backends}")
    print(f"{'tokens':>7} {'routing':>8} {'backend':>13} {'ms':>8} {'TFLOP/s':>8} {'max |dgrad - grouped_mm|':>26}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        rows = tokens * TOP_K
        for skewed in (False, True):
            counts = routed_counts(rows, local, skewed).to(dev)
            torch.manual_seed(0)
            x = torch.randn(rows, DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn_like(x)
            reference = None
            for backend in backends:
                module = GroupedExperts(local, DIM, HIDDEN, backend=backend).to(dev, torch.bfloat16)
                module.init_weights(0.02, torch.Generator(dev).manual_seed(0))
                seconds, dgrad = time_backend(module, x, counts, grad, args.iters if backend != "loop" else 3)
                reference = dgrad if reference is None else reference
                tflops = 6 * rows * 3 * DIM * HIDDEN / seconds / 1e12
                diff = (dgrad.float() - reference.float()).abs().max().item()
                routing = "skewed" if skewed else "balanced"
                print(f"{tokens:>7} {routing:>8} {backend:>13} {seconds * 1e3:>8.2f} {tflops:>8.0f} {diff:>26.2e}")
                rows_out.append(dict(tokens=tokens, routing=routing, backend=backend, ms=seconds * 1e3,
                                     tflops=tflops, max_dgrad_diff=diff))
                del module
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
