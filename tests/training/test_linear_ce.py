"""Chunked linear cross-entropy against a full-logits fp64 reference: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from mirotrain.modules.loss import LigerLinearCrossEntropyLoss, LinearCrossEntropyLoss

IGNORE = -100


def _reference(hidden, weight, labels, dtype=torch.float64):
    """Full [tokens, vocab] logits and F.cross_entropy (the thing the chunked loss must equal)."""
    h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
    logits = h.reshape(-1, h.shape[-1]) @ w.t()
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad, int((labels != IGNORE).sum())


def _inputs(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(300, 16, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, 300, (2, 37))
    labels[torch.rand(2, 37) < 0.4] = IGNORE
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_full_cross_entropy(chunk_tokens, dtype):
    """fp64: equal to the fp64 full-logits CE to rounding; fp32: within 1e-6 of the fp32 full-logits CE."""
    hidden, weight, labels = _inputs(dtype)
    loss_sum, count = LinearCrossEntropyLoss(chunk_tokens=chunk_tokens)(hidden, weight, labels)
    (loss_sum * 0.5).backward()  # a non-unit upstream gradient must scale both grads
    ref_loss, ref_dh, ref_dw, ref_count = _reference(hidden, weight, labels, dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    assert int(count) == ref_count
    assert abs(loss_sum.double() - ref_loss.double()).item() <= tol * ref_loss.abs().item()
    assert (hidden.grad - 0.5 * ref_dh).abs().max().item() <= tol
    assert (weight.grad - 0.5 * ref_dw).abs().max().item() <= tol


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.full((1, 5), IGNORE)
    loss_sum, count = LinearCrossEntropyLoss()(hidden, weight, labels)
    loss_sum.backward()  # still connected: every rank runs the same backward under FSDP
    assert loss_sum.item() == 0.0 and int(count) == 0
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_no_grad_forward_matches():
    torch.manual_seed(1)
    hidden, weight = torch.randn(1, 9, 8), torch.randn(13, 8)
    labels = torch.randint(0, 13, (1, 9))
    with torch.no_grad():
        loss_sum, _ = LinearCrossEntropyLoss(chunk_tokens=4)(hidden, weight, labels)
    ref = F.cross_entropy((hidden[0].double() @ weight.double().t()), labels[0], reduction="sum")
    assert abs(loss_sum.double() - ref).item() <= 1e-6 * ref.item()


def test_liger_loss_refuses_cpu_with_a_clear_message():
    hidden, weight = torch.randn(1, 3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="CUDA only.*LinearCrossEntropyLoss"):
        LigerLinearCrossEntropyLoss()(hidden, weight, torch.zeros(1, 3, dtype=torch.long))
