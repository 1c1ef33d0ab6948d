"""Fused, chunked LM-head log-prob sums against a plain full-logits log_softmax (fp32 CPU)."""

from __future__ import annotations

import pytest
import torch

from mirotrain.modules.loss.logprobs import (
    FusedLinearLogProb,
    segment_ids_from_cu_seqlens,
    sequence_logprobs,
)


def naive_sequence_logprobs(hidden, weight, labels, segment_ids, num_segments):
    """Full [tokens, vocab] logits, log_softmax, gather, masked per-segment sum."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    logp = torch.log_softmax(logits, dim=-1)
    labels = labels.reshape(-1)
    valid = labels != -100
    tok = logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1) * valid
    seg = segment_ids.reshape(-1).clamp_min(0)
    return torch.stack([tok[(seg == s) & valid].sum() for s in range(num_segments)])


def _case(seed, n=97, d=24, v=301, segments=5, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, d, generator=g) * 2
    weight = torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (1, n), generator=g)
    labels[torch.rand(1, n, generator=g) < ignore_frac] = -100
    cuts = torch.sort(torch.randperm(n - 1, generator=g)[: segments - 1] + 1).values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]).int()
    return hidden, weight, labels, segment_ids_from_cu_seqlens(cu, n)[None], segments


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 4096])
def test_values_and_grads_match_full_logits(chunk_size):
    hidden, weight, labels, seg, s = _case(0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # the plain computation in float64: the fp32 fused path must agree with the exact value
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    sums, counts = sequence_logprobs(h1, w1, labels, seg, s, chunk_size=chunk_size)
    ref = naive_sequence_logprobs(h2, w2, labels, seg, s)
    torch.testing.assert_close(sums.double(), ref, atol=1e-5, rtol=1e-6)
    assert counts.tolist() == [int(((seg[0] == i) & (labels[0] != -100)).sum()) for i in range(s)]
    upstream = torch.randn(s)
    (sums * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    # gradients are sums over the vocabulary/tokens of fp32 products: compare at fp32 accumulation accuracy
    torch.testing.assert_close(h1.grad.double(), h2.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(w1.grad.double(), w2.grad, atol=5e-5, rtol=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (9,), generator=g)
    # the op returns fp32 by design; gradcheck in float64 through a float64 wrapper of the same math
    fn = lambda h, w: FusedLinearLogProb.apply(h.float(), w.float(), t, 4).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_no_full_logits_kept_for_backward():
    """Saved tensors are hidden, weight, targets and one fp32 lse per token — nothing of size tokens x vocab."""
    hidden, weight, labels, seg, s = _case(2, n=64, v=1000)
    hidden.requires_grad_()
    sums, _ = sequence_logprobs(hidden, weight, labels, seg, s, chunk_size=8)
    saved = []
    stack = [sums.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None:
            continue
        saved += [t for t in getattr(fn, "saved_tensors", ()) if isinstance(t, torch.Tensor)]
        stack += [f for f, _ in fn.next_functions]
    assert saved, "expected the fused op's saved tensors"
    assert max(t.numel() for t in saved) <= max(hidden.numel(), weight.numel())
    assert not any(t.dim() == 2 and t.shape[-1] == weight.shape[0] for t in saved)


def test_all_ignored_gives_zero_with_grad():
    hidden, weight, labels, seg, s = _case(3)
    labels[:] = -100
    w = weight.clone().requires_grad_()
    sums, counts = sequence_logprobs(hidden, w, labels, seg, s)
    assert torch.equal(sums, torch.zeros(s)) and counts.sum() == 0
    sums.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_segment_ids_from_cu_seqlens_marks_padding():
    ids = segment_ids_from_cu_seqlens(torch.tensor([0, 2, 5], dtype=torch.int32), 7)
    assert ids.tolist() == [0, 0, 1, 1, 1, -1, -1]
