"""GPU: the CUDA attention backends against masked SDPA, and a full-width Qwen3-8B slice against transformers."""

import pytest
import torch

from mirotrain.modules.attention import attention, available_backends


def bf16_close(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (got.float() - ref.float()).abs()
    return diff.max().item(), (diff.norm() / ref.float().norm()).item()


@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_varlen_backend_matches_masked_sdpa(cuda, backend):
    if backend not in available_backends(cuda):
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    lengths = [3000, 517, 4096, 1, 2578]
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=cuda)
    q = torch.randn(1, total, 32, 128, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, total, 8, 128, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, total, 8, 128, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), backend=backend)
    ref = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), backend="sdpa")
    max_abs, rel = bf16_close(out, ref)
    print(f"\n[{backend} vs masked sdpa] forward max-abs {max_abs:.3e} rel-L2 {rel:.3e}")
    assert rel < 1e-2 and max_abs < 5e-2
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        max_abs, rel = bf16_close(a, b)
        print(f"[{backend} vs masked sdpa] d{name} max-abs {max_abs:.3e} rel-L2 {rel:.3e}")
        assert rel < 2e-2


def test_qwen3_8b_slice_bf16_matches_transformers(cuda, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mirotrain.models import from_pretrained

    cfg = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    hf = hf.to(cuda).eval()
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16, device=cuda).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device=cuda)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        for backend in available_backends(cuda):
            for layer in ours.layers:
                layer.attention.backend = backend
            cu = torch.tensor([0, 2048], dtype=torch.int32, device=cuda)
            got = ours(ids, cu_seqlens=cu if backend != "sdpa" else None, max_seqlen=2048).float()
            max_abs, rel = bf16_close(got, ref)
            print(f"\n[8B 2-layer bf16, ours({backend}) vs transformers] logits max-abs {max_abs:.3e} rel-L2 {rel:.3e}")
            assert rel < 2e-2
