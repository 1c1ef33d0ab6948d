"""``mlp_tiles`` on the GPU: the tiled SwiGLU (mirotrain/modules/tiled_mlp.py) in bf16 at Qwen3-8B's MLP width,
against a float64 computation, no less accurate than the plain bf16 MLP, and holding less memory in backward."""

import pytest
import torch
import torch.nn.functional as F

from mirotrain.modules.tiled_mlp import tiled_swiglu


def _plain(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _output_and_grads(fn, x, w1, w3, w2, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w3, w2)]
    out = fn(*leaves)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("tiles", [1, 4, 7])
def test_tiled_mlp_matches_float64_no_worse_than_the_plain_mlp(cuda, tiles):
    torch.manual_seed(0)
    tokens, dim, hidden = 4096, 4096, 12288
    x = torch.randn(tokens, dim, device=cuda)
    w1, w3 = (torch.randn(hidden, dim, device=cuda) * 0.02 for _ in range(2))
    w2 = torch.randn(dim, hidden, device=cuda) * 0.02
    dy = torch.randn(tokens, dim, device=cuda)
    want = _output_and_grads(_plain, *(t.double() for t in (x, w1, w3, w2, dy)))
    bf16 = [t.bfloat16() for t in (x, w1, w3, w2, dy)]
    plain = _output_and_grads(_plain, *bf16)
    tiled = _output_and_grads(lambda *a: tiled_swiglu(*a, tiles), *bf16)
    for name, w, p, t in zip(("out", "dx", "dw1", "dw3", "dw2"), want, plain, tiled):
        plain_err = (p.double() - w).norm() / w.norm()
        tiled_err = (t.double() - w).norm() / w.norm()
        assert tiled_err <= 1.5 * plain_err + 1e-4, (name, tiled_err.item(), plain_err.item())


def test_tiled_mlp_backward_holds_less_memory(cuda):
    tokens, dim, hidden = 16384, 4096, 12288
    weights = [(torch.randn(*shape, device=cuda) * 0.02).bfloat16().requires_grad_()
               for shape in ((hidden, dim), (hidden, dim), (dim, hidden))]
    x = torch.randn(tokens, dim, device=cuda, dtype=torch.bfloat16, requires_grad=True)

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, *weights).sum().backward()
        torch.cuda.synchronize()
        for t in (x, *weights):
            t.grad = None
        return torch.cuda.max_memory_allocated() - base

    plain = peak(lambda *a: _plain(a[0], a[1], a[2], a[3]))
    tiled = peak(lambda *a: tiled_swiglu(*a, 8))
    # Both hold the input and weight gradients and the output (~0.55 GiB). Beyond them the plain MLP keeps gate, up
    # and their product (3 x 16384 x 12288 x 2 B = 1.125 GiB) and in backward their gradients beside them, the
    # tiled one at most five slices of an eighth of that width. Measured on 1x H200 (2026-11-30): 2.34 vs 0.95 GiB.
    assert tiled < plain / 2 and tiled < plain - 2**30, (plain / 2**30, tiled / 2**30)
