"""The MoE dispatch's row permutations (mirotrain/modules/moe/permute.py) against the indexing they replace:
the same values bit for bit, the same gradients (bit for bit for a permutation, up to summation order for the
k slot copies), and less saved for backward in a MoE layer."""

from __future__ import annotations

import torch

from mirotrain.modules.moe import MoE
from mirotrain.modules.moe.permute import expand_rows, inverse_permutation, permute_rows

N, K, D, E = 40, 4, 24, 8


def routing(seed: int = 0) -> torch.Tensor:
    """The expert-sorted slot order of N tokens' top-K choices among E experts, as MoE.forward builds it."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.rand(N, E, generator=gen).topk(K, dim=-1).indices
    return torch.argsort(experts.reshape(-1), stable=True)


def test_inverse_permutation():
    order = routing()
    inverse = inverse_permutation(order)
    assert torch.equal(inverse[order], torch.arange(N * K))
    assert torch.equal(inverse, torch.argsort(order))


def test_permute_rows_equals_indexing_and_its_gradient():
    order = routing()
    x = torch.randn(N * K, D, requires_grad=True)
    grad = torch.randn(N * K, D)
    expected = x[order]
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    got = permute_rows(x, order, inverse_permutation(order))
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)
    # the unpermute of MoE.forward: empty_like(y).index_copy(0, order, y) == y[inverse]
    y = torch.randn(N * K, D)
    assert torch.equal(permute_rows(y, inverse_permutation(order), order), torch.empty_like(y).index_copy(0, order, y))


def test_expand_rows_equals_indexing_and_its_gradient():
    order = routing(1)
    x = torch.randn(N, D, requires_grad=True)
    grad = torch.randn(N * K, D)
    expected = x[order // K]
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    got = expand_rows(x, order, inverse_permutation(order), K)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-6, atol=1e-6)  # summation order only


def _moe_with_indexing(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward as it was written with plain indexing (the reference)."""
    weights, experts = moe.router(x)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(moe.num_experts, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
    y_sorted = moe.dispatcher(x[order // moe.top_k], counts, moe.experts)
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y.view(x.shape[0], moe.top_k, -1)).squeeze(1)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_moe_layer_unchanged_and_saves_less():
    torch.manual_seed(0)
    moe = MoE(D, 16, E, K)
    gen = torch.Generator().manual_seed(0)
    moe.router.init_weights(0.5, gen)
    moe.experts.init_weights(0.1, gen)
    x = torch.randn(N, D, requires_grad=True)
    grad = torch.randn(N, D)
    expected, old_bytes = _saved_bytes(lambda: _moe_with_indexing(moe, x))
    expected_grads = torch.autograd.grad(expected, [x, *moe.parameters()], grad)
    got, new_bytes = _saved_bytes(lambda: moe(x))
    got_grads = torch.autograd.grad(got, [x, *moe.parameters()], grad)
    assert torch.equal(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # index_copy kept the [N*k, D] expert outputs; the permutation keeps two int64 index vectors instead
    assert old_bytes - new_bytes >= N * K * D * 4 - 2 * N * K * 8
