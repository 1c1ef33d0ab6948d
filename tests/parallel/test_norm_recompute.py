"""Eager layers recompute their norms in backward (mirotrain/parallel/norm_recompute.py): the gradients are bit
for bit those of the plain model, under full activation checkpointing too, in fp32 and bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from mirotrain.models.qwen3.builders import qwen3
from mirotrain.parallel.activation_checkpoint import apply_activation_checkpointing
from mirotrain.parallel.norm_recompute import apply_norm_recompute


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model(ids).float().logsumexp(-1).sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ac_mode", [None, "full", "selective"])
def test_recomputed_norms_give_the_same_gradients(dtype, ac_mode):
    torch.manual_seed(0)
    plain = qwen3(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                  max_seq_len=64).to(dtype)
    recomputed = copy.deepcopy(plain)
    apply_norm_recompute(recomputed)
    if ac_mode:
        option = "op" if ac_mode == "selective" else None
        apply_activation_checkpointing(plain, ac_mode, option)
        apply_activation_checkpointing(recomputed, ac_mode, option)
    ids = torch.randint(0, 128, (2, 24))
    expected, actual = _grads(plain, ids), _grads(recomputed, ids)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
