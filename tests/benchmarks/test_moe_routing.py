"""benchmarks/moe_routing.py: forced balanced routing gives every expert the same load in our Qwen3-MoE and in
transformers', through each model's own router code, and backward still runs through the gate."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from benchmarks.moe_routing import LoadMeter, install_balanced_routing
from mirotrain.models.qwen3_moe import qwen3_moe

E, K, TOKENS = 8, 2, 64  # TOKENS * K is a multiple of E: every expert gets TOKENS * K / E = 16 rows


def tiny_ours() -> nn.Module:
    torch.manual_seed(0)
    model = qwen3_moe(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8, hidden_dim=64,
                      num_experts=E, num_experts_per_tok=K, moe_hidden_dim=16, max_seq_len=256,
                      tie_word_embeddings=False, router_aux_loss_coef=0.001)
    model.init_weights(seed=0)
    return model


def tiny_hf() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        intermediate_size=64, moe_intermediate_size=16, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
        output_router_logits=True, router_aux_loss_coef=0.001))


def test_ours_balanced_load_and_router_in_the_graph():
    model = tiny_ours()
    ids = torch.randint(0, 128, (1, TOKENS))
    model(ids)
    assert model.expert_load_stats()["moe/max_over_mean_load"] > 1.0  # random routers: uneven
    assert install_balanced_routing(model, E, K) == 2
    weights, experts = model.layers[0].feed_forward.router(torch.randn(TOKENS, 32))
    expected = (torch.arange(TOKENS).unsqueeze(1) * K + torch.arange(K)) % E  # token t: the slice t*k .. t*k+k-1
    assert torch.equal(experts.sort(dim=-1).values, expected)
    assert torch.allclose(weights, torch.full_like(weights, 1 / K))
    logits = model(ids)
    assert model.expert_load_stats()["moe/max_over_mean_load"] == 1.0
    (logits.sum() + model.moe_aux_loss()).backward()
    assert model.layers[0].feed_forward.router.weight.grad is not None


def test_hf_balanced_load_metered():
    model = tiny_hf()
    meter = LoadMeter(model, E, K)
    ids = torch.randint(0, 128, (1, TOKENS))
    model(input_ids=ids)
    assert meter.max_over_mean() > 1.0
    balanced = tiny_hf()
    meter = LoadMeter(balanced, E, K)
    install_balanced_routing(balanced, E, K)
    out = balanced(input_ids=ids, labels=ids)
    assert meter.max_over_mean() == 1.0
    out.loss.backward()


def test_a_model_without_router_is_refused():
    with pytest.raises(RuntimeError, match="no MoE router"):
        install_balanced_routing(nn.Sequential(nn.Linear(4, E)), E, K)
