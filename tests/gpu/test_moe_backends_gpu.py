"""The three expert backends against a float64 per-expert computation, in bf16 on the GPU.

``grouped_mm`` is the default on GPU and ``grouped_gemm`` the optional package (its wheel for the GPU image is
benchmarks/wheels/; the test is skipped where it is not installed). Routing is uneven on purpose: some experts
get three times the mean load and some none, which is what random routing produces at start-up.
"""

import importlib.util

import pytest
import torch

from mirotrain.modules.moe.experts import GroupedExperts


def _float64_reference(x, counts, w1, w3, w2):
    outs = []
    for e, chunk in enumerate(x.double().split(counts.tolist())):
        h = torch.nn.functional.silu(chunk @ w1[e].double().T) * (chunk @ w3[e].double().T)
        outs.append(h @ w2[e].double().T)
    return torch.cat(outs)


def _uneven_counts(experts: int, mean: int) -> torch.Tensor:
    counts = torch.full((experts,), mean, dtype=torch.int64)
    counts[: experts // 4] *= 3
    counts[experts // 4: experts // 2] = 0
    return counts


@pytest.mark.parametrize("backend", ["grouped_mm", "grouped_gemm"])
def test_expert_backend_matches_float64(cuda, backend):
    if backend == "grouped_gemm" and importlib.util.find_spec("grouped_gemm") is None:
        pytest.skip("grouped_gemm not installed (pip install benchmarks/wheels/grouped_gemm-*.whl)")
    torch.manual_seed(0)
    experts, dim, hidden = 16, 2048, 768  # Qwen3-30B-A3B expert width
    module = GroupedExperts(experts, dim, hidden, backend=backend).to(cuda, torch.bfloat16)
    module.init_weights(0.02, torch.Generator(cuda).manual_seed(0))
    counts = _uneven_counts(experts, 256).to(cuda)
    x = torch.randn(int(counts.sum()), dim, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    out = module(x, counts)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    weights = [w.detach().double().requires_grad_() for w in (module.w1, module.w3, module.w2)]
    x64 = x.detach().double().requires_grad_()
    ref = _float64_reference(x64, counts.cpu(), *weights)
    ref.backward(grad_out.double())

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert rel(out, ref) < 1e-2
    assert rel(x.grad, x64.grad) < 1e-2
    for w, w64 in zip((module.w1, module.w3, module.w2), weights):
        assert rel(w.grad, w64.grad) < 1e-2
    assert module.w1.grad[experts // 4: experts // 2].abs().max() == 0  # experts with no rows get no gradient
