"""``mlp_tiles`` (#18): one decoder layer's MLP, forward + backward, untiled and in tiles, beside transformers'
``Qwen3MLP`` on the same card: peak memory above the inputs, time, and the difference from the untiled result.

The shapes are a Qwen3 size's MLP (``--size``: D and F) at ``--tokens`` tokens in bf16. Memory is the allocator's
peak above what is allocated before the call (inputs and weights), so it includes the output and the four
gradients (x, w1, w3, w2) that every variant returns; time is the median of ``--repeats`` CUDA-event-timed calls
after two warm-up calls. This is what `mirotrain validate`'s estimate counts for the recomputed layer's MLP
(mirotrain/commands/step_memory.py: ``layer_activation_bytes``).

Usage (GPU machine, ~1 minute):
  python benchmarks/tiled_mlp.py --size 32B --tokens 40960 [--tiles 4 8 16] [--json $OUT/tiled_mlp.json]
  python benchmarks/tiled_mlp.py --cpu-smoke        # tiny shapes on CPU: the plumbing and the differences
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirotrain.modules.tiled_mlp import tiled_swiglu  # noqa: E402

SIZES = {"8B": (4096, 12288), "14B": (5120, 17408), "32B": (5120, 25600)}


def plain_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def hf_mlp(dim: int, hidden: int, weights: list[torch.Tensor]):
    """transformers' Qwen3MLP holding the same weights, as a function of x."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    module = Qwen3MLP(Qwen3Config(hidden_size=dim, intermediate_size=hidden, hidden_act="silu"))
    module = module.to(weights[0].device, weights[0].dtype)
    with torch.no_grad():
        for linear, w in zip((module.gate_proj, module.up_proj, module.down_proj), weights):
            linear.weight.copy_(w)
    return module


def measure(fn, x: torch.Tensor, params: list[torch.Tensor], repeats: int) -> tuple[float, float, list[torch.Tensor]]:
    """(peak bytes above the inputs, median seconds, [output, grads]) of ``fn(x).backward(dy)``."""
    cuda = x.is_cuda
    dy = torch.ones_like(x) / x.shape[-1]

    def call() -> list[torch.Tensor]:
        for t in (x, *params):
            t.grad = None
        out = fn(x)
        out.backward(dy)
        return [out.detach()] + [t.grad for t in (x, *params)]

    for _ in range(2):
        call()
    times = []
    peak = 0
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            for t in (x, *params):
                t.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = call()
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        times.append(time.perf_counter() - start)
    return peak, statistics.median(times), result


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="32B")
    p.add_argument("--tokens", type=int, default=40960)
    p.add_argument("--tiles", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--cpu-smoke", action="store_true")
    ns = p.parse_args()
    if ns.cpu_smoke:
        device, dtype, (dim, hidden), ns.tokens, ns.repeats = torch.device("cpu"), torch.float32, (64, 256), 512, 2
    else:
        device, dtype, (dim, hidden) = torch.device("cuda"), torch.bfloat16, SIZES[ns.size]
    gen = torch.Generator(device).manual_seed(0)
    weights = [(torch.randn(*shape, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
               for shape in ((hidden, dim), (hidden, dim), (dim, hidden))]
    x = torch.randn(ns.tokens, dim, device=device, generator=gen).to(dtype).requires_grad_()
    hf = hf_mlp(dim, hidden, [w.detach() for w in weights])
    hf_params = [hf.gate_proj.weight, hf.up_proj.weight, hf.down_proj.weight]

    variants = [("ours, untiled", lambda t: plain_mlp(t, *weights), weights), ("HF Qwen3MLP", hf, hf_params)]
    variants += [(f"ours, mlp_tiles={k}", lambda t, k=k: tiled_swiglu(t, *weights, k), weights) for k in ns.tiles]
    rows, reference = [], None
    print(f"MLP of Qwen3-{ns.size if not ns.cpu_smoke else 'tiny'}: D {dim}, F {hidden}, {ns.tokens:,} tokens, {dtype}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    print(f"{'variant':<22}{'peak GiB':>10}{'ms':>9}{'vs untiled':>12}")
    for name, fn, params in variants:
        peak, seconds, result = measure(fn, x, params, ns.repeats)
        reference = reference or result  # the first variant: untiled
        diff = rel_diff(result, reference)
        rows.append({"variant": name, "peak_gib": peak / 2**30, "ms": seconds * 1e3, "max_rel_diff": diff})
        print(f"{name:<22}{peak / 2**30:>10.2f}{seconds * 1e3:>9.1f}{diff:>12.2e}", flush=True)
    if ns.json:
        Path(ns.json).write_text(json.dumps({"size": ns.size, "tokens": ns.tokens, "dim": dim, "hidden": hidden,
                                             "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
