"""GPU: one full-width Qwen3-30B-A3B decoder layer (attention + 128-expert MoE) in bf16, ours against transformers'
Qwen3MoeDecoderLayer with the same weights, both measured against a float64 reference.

The weights go through both checkpoint directions: a random init of ours is written by our HF writer
(``save_pretrained``, per-expert tensors) and read back by our loader (``from_pretrained``) and by transformers
(``Qwen3MoeForCausalLM.from_pretrained``), so every model holds the same bf16 values. The reference is
transformers' layer in float64 (SDPA's math kernel, the per-expert loop).

Routing and arithmetic are judged apart. Top-k is discontinuous: where a token's 8th and 9th experts are
near-tied, bf16 rounding upstream of the router (or in it: transformers' gate runs in bf16, ours in fp32) can
pick a different 8th expert than the float64 reference, and that token's MoE output then differs by a whole
expert's share. On CPU at 30B-A3B width (128 experts, 512 tokens) 3-4% of the tokens flip and carry about
99% of the MoE output's squared L2 error, so an all-token comparison counts flips, not rounding. Hence:

- routing: the tokens whose expert set differs from the reference's; ours may flip at most ``SLACK`` times
  as many as transformers';
- arithmetic: the relative L2 error of the layer output and input gradient over the tokens where both bf16
  layers chose the reference's experts. Transformers' own error there is the scale of bf16 rounding for these
  shapes and weights (unit roundoff 2^-8, fp32 accumulation); ours may exceed it by ``SLACK`` (a different
  summation order) and must stay under ``ABS_REL_L2``. The input gradient of an agreeing token still sees the
  flipped tokens through attention's backward, a second-order share.

All-token errors and the attention sub-block's error are printed for the record.
"""

from __future__ import annotations

import torch

TOKENS = 4096
SLACK = 1.25      # ours' error (and flip count) may exceed transformers' by this factor ...
ABS_REL_L2 = 2e-2  # ... and must stay under this relative L2 error


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max-abs, relative L2) of ``got`` against ``ref``, in float64."""
    diff = got.double() - ref.double()
    return diff.abs().max().item(), (diff.norm() / ref.double().norm()).item()


def _record(module: torch.nn.Module, into: dict, key: str, pick) -> None:
    """Keep ``pick(output)`` of ``module``'s last forward in ``into[key]``."""
    module.register_forward_hook(lambda mod, args, out: into.__setitem__(key, pick(out).detach()))


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


def _same_experts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] bool: token n chose the same set of experts in ``a`` and ``b`` (both [N, k])."""
    return (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)


def _compare(what: str, ours: torch.Tensor, hf: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Print the errors of ours and transformers' against the reference -> their relative L2 errors."""
    ours_err, hf_err, direct = _errors(ours, ref), _errors(hf, ref), _errors(ours, hf.double())
    print(f"  {what} (max-abs, rel-L2): ours vs float64 {ours_err[0]:.3e}, {ours_err[1]:.3e} | "
          f"transformers vs float64 {hf_err[0]:.3e}, {hf_err[1]:.3e} | "
          f"ours vs transformers {direct[0]:.3e}, {direct[1]:.3e}")
    return ours_err[1], hf_err[1]


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
    seen: dict[str, torch.Tensor] = {}
    for name, model in (("hf", hf), ("ref", ref)):
        _record(model.model.layers[0].mlp.gate, seen, f"{name} experts", lambda out: out[2])
        _record(model.model.layers[0].self_attn, seen, f"{name} attention", lambda out: out[0])
    _record(ours.layers[0].feed_forward.router, seen, "ours experts", lambda out: out[1])
    _record(ours.layers[0].attention, seen, "ours attention", lambda out: out)

    gen = torch.Generator(cuda).manual_seed(1)
    x = torch.randn(1, TOKENS, ours.args.dim, device=cuda, dtype=torch.bfloat16, generator=gen)
    grad_out = torch.randn(x.shape, device=cuda, dtype=torch.bfloat16, generator=gen)
    ref_out, ref_grad = _hf_layer_run(ref, x.double(), grad_out.double())
    hf_out, hf_grad = _hf_layer_run(hf, x, grad_out)
    our_out, our_grad = _our_layer_run(ours, x, grad_out)

    ours_agree = _same_experts(seen["ours experts"], seen["ref experts"])
    hf_agree = _same_experts(seen["hf experts"], seen["ref experts"])
    agree = ours_agree & hf_agree
    ours_flips, hf_flips = int((~ours_agree).sum()), int((~hf_agree).sum())
    print(f"\n30B-A3B layer, {TOKENS} tokens, bf16. Tokens routed unlike float64: ours {ours_flips}, "
          f"transformers {hf_flips}; both like float64: {int(agree.sum())}")
    att = [_errors(seen[f"{name} attention"], seen["ref attention"]) for name in ("ours", "hf")]
    print(f"  attention sub-block (max-abs, rel-L2): ours {att[0][0]:.3e}, {att[0][1]:.3e} | "
          f"transformers {att[1][0]:.3e}, {att[1][1]:.3e}")
    cases = (("output", our_out, hf_out, ref_out), ("input grad", our_grad, hf_grad, ref_grad))
    for what, ours_t, hf_t, ref_t in cases:
        _compare(f"{what}, all tokens", ours_t[0], hf_t[0], ref_t[0])
        ours_err, hf_err = _compare(f"{what}, agreeing tokens", ours_t[0, agree], hf_t[0, agree], ref_t[0, agree])
        assert ours_err <= SLACK * hf_err and ours_err < ABS_REL_L2, what
    assert ours_flips <= SLACK * hf_flips, f"{ours_flips} routing flips against transformers' {hf_flips}"
