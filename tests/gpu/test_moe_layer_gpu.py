"""GPU: one full-width Qwen3-30B-A3B decoder layer (attention + 128-expert MoE) in bf16, ours against transformers'
Qwen3MoeDecoderLayer with the same weights, both measured against a float64 reference.

The weights go through both checkpoint directions: a random init of ours is written by our HF writer
(``save_pretrained``, per-expert tensors) and read back by our loader (``from_pretrained``) and by transformers
(``Qwen3MoeForCausalLM.from_pretrained``), so every model holds the same bf16 values. The reference is
transformers' layer in float64 (SDPA's math kernel, the per-expert loop).

Tolerance. Both bf16 layers differ from the float64 reference by rounding alone (unit roundoff 2^-8, fp32
accumulation): how far transformers' own bf16 run lands from it is the scale of that error for these shapes
and weights. Ours must land no farther, up to 25% for a different summation order, and within 2% (relative L2)
in absolute terms; the maximum errors are printed for the record. Routing near-ties can pick a different 8th
expert than the reference; that shows in the maximum error of a few tokens, not in the L2 error.
"""

from __future__ import annotations

import torch

TOKENS = 4096
SLACK = 1.25      # ours' error may exceed transformers' by this factor ...
ABS_REL_L2 = 2e-2  # ... and must stay under this relative L2 error


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max-abs, relative L2) of ``got`` against ``ref``, in float64."""
    diff = got.double() - ref.double()
    return diff.abs().max().item(), (diff.norm() / ref.double().norm()).item()


def _hf_layer_run(model, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' first decoder layer on ``x`` (causal: SDPA without a mask) -> (output, input gradient)."""
    x = x.detach().requires_grad_()
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    out = model.model.layers[0](x, attention_mask=None, position_ids=pos,
                                position_embeddings=model.model.rotary_emb(x, pos))
    out = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
    (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return out.detach(), grad


def _our_layer_run(model, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    cos, sin = model.rope(pos, x.dtype)
    out = model.layers[0](x, cos, sin)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out.detach(), grad


def test_30b_a3b_layer_bf16_matches_transformers(cuda, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    from mirotrain.models import from_pretrained, save_pretrained
    from mirotrain.models.qwen3_moe import qwen3_30b_a3b

    with torch.device("meta"):
        init = qwen3_30b_a3b(n_layers=1, vocab_size=1024)  # full-width layer; the vocabulary does not matter here
    init.to_empty(device=cuda)
    init.rope.reset_parameters()
    init.init_weights(seed=0, device=cuda)
    save_pretrained(init, tmp_path, dtype=torch.bfloat16)
    del init
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16, device=cuda)
    hf = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").to(cuda)
    ref = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="sdpa",
                                              experts_implementation="eager").to(cuda)

    gen = torch.Generator(cuda).manual_seed(1)
    x = torch.randn(1, TOKENS, ours.args.dim, device=cuda, dtype=torch.bfloat16, generator=gen)
    grad_out = torch.randn(x.shape, device=cuda, dtype=torch.bfloat16, generator=gen)
    ref_out, ref_grad = _hf_layer_run(ref, x.double(), grad_out.double())
    hf_out, hf_grad = _hf_layer_run(hf, x, grad_out)
    our_out, our_grad = _our_layer_run(ours, x, grad_out)

    print(f"\n30B-A3B layer, {TOKENS} tokens, bf16 (max-abs, rel-L2):")
    cases = (("output", our_out, hf_out, ref_out), ("input grad", our_grad, hf_grad, ref_grad))
    for what, ours_t, hf_t, ref_t in cases:
        ours_err, hf_err = _errors(ours_t, ref_t), _errors(hf_t, ref_t)
        direct = _errors(ours_t, hf_t.double())
        print(f"  {what}: ours vs float64 {ours_err[0]:.3e}, {ours_err[1]:.3e} | transformers vs float64 "
              f"{hf_err[0]:.3e}, {hf_err[1]:.3e} | ours vs transformers {direct[0]:.3e}, {direct[1]:.3e}")
        assert ours_err[1] <= SLACK * hf_err[1] and ours_err[1] < ABS_REL_L2, what
