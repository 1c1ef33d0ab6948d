"""FP8 training on the GPU (mirotrain/parallel/float8.py): a float8 Linear at Qwen3-8B's MLP shape, with the
real ``torch._scaled_mm``, against a float64 computation, the emulated float8 math and bf16; eager and
compiled (the trainer compiles decoder layers).

Tolerances: round-to-nearest with p mantissa bits leaves a relative RMS error of about 2^-(p+1)/sqrt(3) times
~0.75 (the mean of 1/mantissa) on random data: ~0.026 for e4m3 (p = 3), ~0.052 for e5m2 (p = 2), ~0.0015 for
bf16. A matmul of two independently rounded operands adds them in quadrature: ~0.037 for e4m3 x e4m3, ~0.058
for e5m2 x e4m3 (the tensorwise recipe's gradients); measured on CPU with torchao's emulation: 0.0375 and
0.0589. The bounds are those with ~20% room. The hardware and the emulation share the quantisation and differ
only in accumulation and the bf16 rounding of the output: under 2e-2 (Hopper's fast fp8 accumulation, which
the tensorwise forward uses, keeps ~14 bits: ~0.5% over K = 4096, at most ~2%), half the quantisation error,
so a scale or cast that differs from the emulation's fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mirotrain.parallel.float8 import apply_float8_training, fp8_device_problem

E4M3_PAIR, E5M2_PAIR, BF16_PAIR = 0.045, 0.07, 0.005
EMULATION = 2e-2
# (output, input gradient, weight gradient) bounds per recipe: rowwise casts gradients to e4m3 too,
# rowwise_with_gw_hp keeps the weight gradient's GEMM in bf16
BOUNDS = {"tensorwise": (E4M3_PAIR, E5M2_PAIR, E5M2_PAIR), "rowwise": (E4M3_PAIR, E4M3_PAIR, E4M3_PAIR),
          "rowwise_with_gw_hp": (E4M3_PAIR, E4M3_PAIR, BF16_PAIR)}


@pytest.fixture(scope="module")
def fp8_cuda(cuda):
    problem = fp8_device_problem(cuda)
    if problem is not None:
        pytest.skip(problem)
    return cuda


def _float8(linear: nn.Linear, recipe: str, emulate: bool = False) -> nn.Module:
    holder = nn.ModuleDict({"layers": nn.ModuleDict({"0": copy.deepcopy(linear)})})
    apply_float8_training(holder, recipe, sharded=False, emulate=emulate)
    return holder["layers"]["0"]


def _run(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(dy)
    return [out.detach(), x.grad, module.weight.grad]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_float8_linear_against_float64_emulation_and_bf16(fp8_cuda, recipe):
    torch.manual_seed(0)
    tokens, dim, hidden = 4096, 4096, 12288
    linear = nn.Linear(dim, hidden, bias=False, device=fp8_cuda, dtype=torch.bfloat16)
    nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(tokens, dim, device=fp8_cuda, dtype=torch.bfloat16)
    dy = torch.randn(tokens, hidden, device=fp8_cuda, dtype=torch.bfloat16)
    reference = _run(copy.deepcopy(linear).double(), x.double(), dy.double())
    bf16 = _run(copy.deepcopy(linear), x, dy)
    fp8 = _run(_float8(linear, recipe), x, dy)
    emulated = _run(_float8(linear, recipe, emulate=True), x, dy)
    for name, want, plain, got, emu, bound in zip(("out", "dx", "dw"), reference, bf16, fp8, emulated,
                                                   BOUNDS[recipe]):
        assert _rel(plain, want) < BF16_PAIR, name
        assert _rel(got, want) < bound, (name, _rel(got, want))
        assert _rel(got, emu) < EMULATION, (name, _rel(got, emu))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_float8_linear_matches_eager(fp8_cuda, recipe):
    torch.manual_seed(1)
    linear = nn.Linear(2048, 6144, bias=False, device=fp8_cuda, dtype=torch.bfloat16)
    x = torch.randn(2048, 2048, device=fp8_cuda, dtype=torch.bfloat16)
    dy = torch.randn(2048, 6144, device=fp8_cuda, dtype=torch.bfloat16)
    eager = _run(_float8(linear, recipe), x, dy)
    compiled_module = _float8(linear, recipe)
    compiled_module.forward = torch.compile(compiled_module.forward)
    compiled = _run(compiled_module, x, dy)
    for name, want, got in zip(("out", "dx", "dw"), eager, compiled):
        assert _rel(got, want) < 1e-2, (name, _rel(got, want))
