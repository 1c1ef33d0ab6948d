"""tiled_swiglu against the plain SwiGLU formula under autograd: float64 exactness, bf16 accuracy, what it saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mirotrain.modules.tiled_mlp import tiled_swiglu


def plain_swiglu(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def make_inputs(shape, dim, hidden, dtype, seed=0):
    """x ``shape + (dim,)``, w1/w3 ``[hidden, dim]``, w2 ``[dim, hidden]``, all leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dim, generator=gen, dtype=torch.float64)
    w1 = torch.randn(hidden, dim, generator=gen, dtype=torch.float64) / dim**0.5
    w3 = torch.randn(hidden, dim, generator=gen, dtype=torch.float64) / dim**0.5
    w2 = torch.randn(dim, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    return [t.to(dtype).requires_grad_() for t in (x, w1, w3, w2)]


def output_and_grads(fn, inputs, dy):
    """``fn(*inputs)`` and the gradients of ``(fn(*inputs) * dy).sum()`` for the inputs that require grad."""
    out = fn(*inputs)
    needing = [t for t in inputs if t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, needing, dy)]


@pytest.mark.parametrize("tiles", [1, 3, 5, 48])
def test_float64_equals_plain_formula(tiles):
    inputs = make_inputs((2, 37), 16, 48, torch.float64)
    dy = torch.randn(2, 37, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = output_and_grads(plain_swiglu, inputs, dy)
    got = output_and_grads(lambda *t: tiled_swiglu(*t, tiles=tiles), inputs, dy)
    for name, e, g in zip(("out", "dx", "dw1", "dw3", "dw2"), expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


def test_grads_only_for_inputs_that_need_them():
    x, w1, w3, w2 = make_inputs((7,), 8, 12, torch.float64)
    x.requires_grad_(False)
    w2.requires_grad_(False)
    dy = torch.randn(7, 8, dtype=torch.float64)
    expected = output_and_grads(plain_swiglu, [x, w1, w3, w2], dy)
    got = output_and_grads(lambda *t: tiled_swiglu(*t, tiles=5), [x, w1, w3, w2], dy)
    assert len(got) == 3
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_gradcheck_three_tiles():
    inputs = make_inputs((2, 3), 4, 7, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: tiled_swiglu(*t, tiles=3), inputs)


def relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("tiles", [4, 64])
def test_bf16_error_no_larger_than_plain_bf16(tiles):
    """Against float64, the tiled bf16 output and grads are within 1.25x the plain bf16 MLP's error.

    The plain MLP rounds each matmul's full sum to bf16 once; the tiled one rounds each slice's partial
    down projection / dx to bf16 before summing in fp32. Measured over 3 seeds at 4 to 64 tiles: at most
    1.06x the plain error (out), 1.01x (dx), the weight grads equal. A bf16 accumulator over slices
    measures 1.1x at 4 tiles and 2.0-2.6x at 64, which the 64-tile case catches.
    """
    reference_inputs = make_inputs((3, 40), 64, 256, torch.float64)
    bf16_inputs = [t.detach().bfloat16().requires_grad_() for t in reference_inputs]
    dy = torch.randn(3, 40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = output_and_grads(plain_swiglu, reference_inputs, dy)
    plain = output_and_grads(plain_swiglu, bf16_inputs, dy.bfloat16())
    tiled = output_and_grads(lambda *t: tiled_swiglu(*t, tiles=tiles), bf16_inputs, dy.bfloat16())
    for name, r, p, t in zip(("out", "dx", "dw1", "dw3", "dw2"), reference, plain, tiled):
        assert t.dtype == torch.bfloat16, name
        plain_error, tiled_error = relative_error(p, r), relative_error(t, r)
        assert tiled_error <= 1.25 * plain_error, (name, tiled_error, plain_error)


def test_same_grads_inside_non_reentrant_checkpoint():
    inputs = make_inputs((2, 9), 8, 20, torch.float64)
    dy = torch.randn(2, 9, 8, dtype=torch.float64)
    direct = output_and_grads(lambda *t: tiled_swiglu(*t, tiles=3), inputs, dy)
    checkpointed = output_and_grads(
        lambda *t: checkpoint(tiled_swiglu, *t, 3, use_reentrant=False), inputs, dy
    )
    for d, c in zip(direct, checkpointed):
        torch.testing.assert_close(c, d, rtol=0, atol=0)


@pytest.mark.parametrize("tiles", [0, 21])
def test_tiles_out_of_range_is_refused(tiles):
    x, w1, w3, w2 = make_inputs((3,), 8, 20, torch.float32)
    with pytest.raises(ValueError, match=r"^tiles must be between 1 and the MLP hidden width 20, got"):
        tiled_swiglu(x, w1, w3, w2, tiles)


def test_saves_only_x_and_weights():
    inputs = make_inputs((2, 11), 8, 24, torch.float32)
    packed = []

    def pack(tensor):
        packed.append((tensor.data_ptr(), tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        tiled_swiglu(*inputs, tiles=4)
    assert sorted(packed) == sorted((t.data_ptr(), tuple(t.shape)) for t in inputs)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(8, 24, bias=False)
        self.w3 = nn.Linear(8, 24, bias=False)
        self.w2 = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return torch.tanh(tiled_swiglu(x * 2, self.w1.weight, self.w3.weight, self.w2.weight, 3)).sum()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiles_into_one_graph_also_under_activation_checkpointing(checkpointed):
    """Custom ops, not a graph break: a layer compiled with its tiled MLP is one graph, also wrapped in
    activation checkpointing (where a break inside would leave the whole layer uncompiled), and equals eager."""
    from torch._dynamo.testing import CompileCounter
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    module = TinyMLP()
    x = torch.randn(2, 5, 8)
    eager_loss = module(x)
    eager_grads = torch.autograd.grad(eager_loss, list(module.parameters()))
    torch._dynamo.reset()
    counter = CompileCounter()
    wrapped = checkpoint_wrapper(module) if checkpointed else module
    compiled = torch.compile(wrapped, backend=counter)
    compiled_loss = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_loss, list(module.parameters()))
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled_loss, eager_loss)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


def test_custom_ops_pass_opcheck_with_non_contiguous_inputs():
    """The fake (meta) results match the real ones in shape, dtype and strides, which torch.compile relies on:
    also for an input that is a transposed view."""
    x, w1, w3, w2 = make_inputs((4, 3), 8, 20, torch.float32)
    x = x.detach().transpose(0, 1).requires_grad_()  # [3, 4, 8], not contiguous
    dy = torch.randn(3, 4, 8)
    torch.library.opcheck(torch.ops.mirotrain.tiled_swiglu, (x, w1, w3, w2, 3))
    torch.library.opcheck(torch.ops.mirotrain.tiled_swiglu_backward,
                          (dy, x.detach(), w1.detach(), w3.detach(), w2.detach(), 3))
