"""Qwen3 decoder in plain PyTorch, single-device; parallelism is applied from outside (mirotrain.parallel).

Math per layer (pre-norm):  h = x + Attn(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h)).
Attention: grouped-query; q/k get an RMSNorm over head_dim *before* RoPE (as the pretrained checkpoints
do); causal within each document of a packed row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mirotrain.modules.attention import attention
from mirotrain.modules.mlp import FeedForward
from mirotrain.modules.norms import RMSNorm
from mirotrain.modules.rope import RotaryEmbedding, apply_rope, validate_yarn


@dataclass
class Qwen3Args:
    vocab_size: int = 151936
    dim: int = 4096
    n_layers: int = 36
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 12288
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 40960
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    attention_backend: str = "auto"
    # MoE (used by mirotrain.models.qwen3_moe; zero experts = dense)
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_hidden_dim: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    moe_backend: str = "grouped_mm"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.rope_scaling is not None:
            validate_yarn(self.rope_scaling, self.max_seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        """config.json's ``model_type``: the family (``models/families.py``) that builds, loads and parallelises it."""
        return "qwen3_moe" if self.is_moe else "qwen3"


class Attention(nn.Module):
    def __init__(self, args: Qwen3Args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.backend = args.attention_backend
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        # Sequence parallelism swaps this for an all-to-all wrapped kernel (mirotrain.parallel.ulysses).
        self.attn_fn = attention

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)  # norm before RoPE
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attn_fn(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                           scale=self.head_dim**-0.5, backend=self.backend)
        return self.wo(out.reshape(bsz, seqlen, -1))


class TransformerBlock(nn.Module):
    def __init__(self, args: Qwen3Args, feed_forward: nn.Module):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = feed_forward

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen)
        return h + self.feed_forward(self.ffn_norm(h))


class Qwen3Transformer(nn.Module):
    """Embedding -> blocks -> final norm -> LM head (tied to the embedding for small sizes)."""

    def __init__(self, args: Qwen3Args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        self.layers = nn.ModuleList(
            TransformerBlock(args, self.build_feed_forward(i)) for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    def build_feed_forward(self, layer_id: int) -> nn.Module:
        return FeedForward(self.args.dim, self.args.hidden_dim)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward_hidden(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None):
        """Final normed hidden states [B, T, D] (fused losses apply the LM head themselves)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        h = self.tok_embeddings(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(h)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None):
        """Logits [B, T, V]."""
        h = self.forward_hidden(input_ids, position_ids, cu_seqlens, max_seqlen)
        return nn.functional.linear(h, self.lm_head_weight)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None, device: torch.device | str = "cpu") -> None:
        """Random init (for runs without a checkpoint): normal(0, std) matrices, unit norms.

        Every full tensor is drawn from one generator on ``device`` (the same values for any sharding); a
        CUDA generator draws 8B parameters in a second where the CPU takes most of a minute per rank. CUDA
        draws differ from CPU draws, and between GPU models with different SM counts (the launch grid sets
        the random stream), so a seed reproduces an init on the same kind of device only.
        """
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape, device=gen.device).normal_(0.0, std, generator=gen)
                module.weight.copy_(w.to(module.weight.device, module.weight.dtype))
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
            elif hasattr(module, "init_weights") and module is not self:
                module.init_weights(std, gen)
