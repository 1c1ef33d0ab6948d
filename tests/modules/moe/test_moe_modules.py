"""Builders (full size on meta), expert backends (grouped_mm == loop), router and registry names."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from mirotrain.config.registry import resolve_component
from mirotrain.models.qwen3_moe import qwen3_235b_a22b, qwen3_30b_a3b, qwen3_moe
from mirotrain.modules.moe import MoE

# Published Hugging Face configs (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B config.json)
HF_CONFIGS = {
    "qwen3_30b_a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          intermediate_size=6144, moe_intermediate_size=768, max_position_embeddings=40960),
    "qwen3_235b_a22b": dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                            intermediate_size=12288, moe_intermediate_size=1536, max_position_embeddings=40960),
}
COMMON = dict(vocab_size=151936, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
              decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)
BUILDERS = {"qwen3_30b_a3b": qwen3_30b_a3b, "qwen3_235b_a22b": qwen3_235b_a22b}


def expected_params(c: dict) -> int:
    """Parameter count from an HF config.

    Untied embedding and LM head: 2 V D; final norm: D. Per layer: q and o projections 2 D (H hd); k and v
    2 D (KV hd); q/k norms 2 hd; two RMSNorms 2 D; router E D; experts E * 3 D I (gate, up, down).
    """
    v, d, hd, e, i = c["vocab_size"], c["hidden_size"], c["head_dim"], c["num_experts"], c["moe_intermediate_size"]
    h, kv = c["num_attention_heads"], c["num_key_value_heads"]
    layer = 2 * d * h * hd + 2 * d * kv * hd + 2 * hd + 2 * d + e * d + e * 3 * d * i
    return 2 * v * d + d + c["num_hidden_layers"] * layer


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_full_size_builder_on_meta_matches_hf_parameter_count(name):
    cfg = {**COMMON, **HF_CONFIGS[name]}
    with torch.device("meta"):
        ours = BUILDERS[name]()
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == expected_params(cfg) == sum(p.numel() for p in hf.parameters())
    assert n_ours == {"qwen3_30b_a3b": 30_532_122_624, "qwen3_235b_a22b": 235_093_634_560}[name]
    a = ours.args
    assert (a.num_experts, a.num_experts_per_tok, a.norm_topk_prob, a.max_seq_len) == (128, 8, True, 40960)
    assert a.router_aux_loss_coef == 0.001 and a.moe_backend == "grouped_mm"
    assert all(isinstance(layer.feed_forward, MoE) for layer in ours.layers)


def test_registry_names_and_builder_arguments():
    with torch.device("meta"):
        model = resolve_component("mirotrain.models.qwen3_moe.qwen3_30b_a3b")(
            router_aux_loss_coef=0.01, use_grouped_gemm=False, n_layers=2)
        assert model.args.router_aux_loss_coef == 0.01 and model.args.moe_backend == "loop"
        assert len(model.layers) == 2 and model.layers[0].feed_forward.experts.backend == "loop"
        big = resolve_component("mirotrain.models.qwen3_moe.qwen3_235b_a22b")(n_layers=1)
        assert big.layers[0].feed_forward.experts.w2.shape == (128, 4096, 1536)
        tiny = resolve_component("mirotrain.models.qwen3_moe.qwen3_moe")(
            vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, num_experts=4, moe_hidden_dim=16,
            num_experts_per_tok=2, use_grouped_gemm=True)
        assert tiny.args.moe_backend == "grouped_mm"


def _moe_pair(seed: int, num_experts: int = 8, top_k: int = 2, dim: int = 32, hidden: int = 24):
    torch.manual_seed(seed)
    a = MoE(dim, hidden, num_experts, top_k, backend="grouped_mm")
    b = MoE(dim, hidden, num_experts, top_k, backend="loop")
    gen = torch.Generator().manual_seed(seed)
    for m in (a, b):
        gen.manual_seed(seed)
        m.router.init_weights(1.0, gen)
        m.experts.init_weights(0.1, gen)
    return a, b


@pytest.mark.parametrize("n_tokens,top_k", [(50, 2), (3, 1)])  # (3, 1): most experts receive no token
def test_grouped_mm_equals_loop_forward_and_grads(n_tokens, top_k):
    grouped, loop = _moe_pair(0, top_k=top_k)
    x = torch.randn(1, n_tokens, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = grouped(xa), loop(xb)
    assert (ya - yb).abs().max().item() <= 1e-5
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert (xa.grad - xb.grad).abs().max().item() <= 1e-5
    for (name, pa), pb in zip(grouped.named_parameters(), loop.parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        assert (pa.grad - pb.grad).abs().max().item() <= 1e-5, name


def test_grouped_mm_bf16_close_to_loop():
    grouped, loop = _moe_pair(1)
    grouped.to(torch.bfloat16)
    loop.to(torch.bfloat16)
    x = torch.randn(1, 64, 32, dtype=torch.bfloat16)
    ya, yb = grouped(x), loop(x)
    assert ya.dtype == torch.bfloat16
    assert (ya.float() - yb.float()).abs().max().item() <= 2e-2 * yb.float().abs().max().item()


def test_moe_matches_dense_definition():
    """out_t = sum_j w_tj Expert_{e_tj}(x_t), written out token by token."""
    moe, _ = _moe_pair(2)
    x = torch.randn(10, 32)
    out = moe(x.unsqueeze(0))[0]
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    w, e = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    ex = moe.experts
    for t in range(10):
        ref = sum(w[t, j] * (ex.w2[e[t, j]] @ (torch.nn.functional.silu(ex.w1[e[t, j]] @ x[t]) * (ex.w3[e[t, j]] @ x[t])))
                  for j in range(2))
        assert (out[t] - ref).abs().max().item() <= 1e-5


def test_backend_errors():
    with pytest.raises(ValueError, match="moe_backend must be one of"):
        MoE(32, 16, 4, 2, backend="fast")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoE(32, 16, 4, 5)
    odd = MoE(30, 14, 4, 2, backend="grouped_mm")  # 30 fp32 = 120 bytes: not a multiple of 16
    for p in odd.parameters():
        torch.nn.init.normal_(p)
    with pytest.raises(ValueError, match="multiples of 16 bytes"):
        odd(torch.randn(1, 5, 30))
    if importlib.util.find_spec("grouped_gemm") is None:
        with pytest.raises(ValueError, match="grouped_gemm package"):
            MoE(32, 16, 4, 2, backend="grouped_gemm")


def test_router_fp32_under_bf16_and_deepcopy():
    import copy

    model = qwen3_moe(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, num_experts=4,
                      moe_hidden_dim=16, num_experts_per_tok=2)
    model.init_weights(seed=0)
    model.to(torch.bfloat16)
    model(torch.randint(0, 64, (1, 8)))
    stats = model.moe_layers()[0].router.stats
    assert stats.prob_sum.dtype == torch.float32
    assert abs(stats.prob_sum.sum().item() - 8) <= 1e-4  # fp32 softmax rows sum to 1
    copy.deepcopy(model)  # router statistics (with autograd history) do not block copying the model
    assert model.moe_aux_loss().dtype == torch.float32
