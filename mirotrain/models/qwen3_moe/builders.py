"""Qwen3-MoE builders with the names MiroTrain configs use (``mirotrain.models.qwen3_moe.qwen3_30b_a3b``).

Sizes are those of the public Hugging Face configs (Qwen/Qwen3-30B-A3B/config.json,
Qwen/Qwen3-235B-A22B/config.json): 128 experts, top-8, ``norm_topk_prob``, vocab 151936, theta 1e6,
eps 1e-6, untied, ``max_position_embeddings`` 40960.

Builder arguments kept from MiroTrain configs: ``router_aux_loss_coef`` (default 0.001 as in the HF
config; stored in the model args, used by ``model.moe_aux_loss()``) and ``use_grouped_gemm`` (True: the
grouped expert backend ``torch._grouped_mm``; False: the per-expert loop). Any :class:`Qwen3Args` field
can be overridden (``n_layers`` for a scaled-down model, ``moe_backend="grouped_gemm"``,
``router_z_loss_coef``). Call under ``torch.device("meta")`` to build without allocating.
"""

from __future__ import annotations

from typing import Any

from mirotrain.models.qwen3.model import Qwen3Args
from mirotrain.models.qwen3_moe.model import Qwen3MoeTransformer

# dim, n_layers, n_heads, n_kv_heads, dense hidden_dim (unused: no mlp_only_layers), moe_hidden_dim
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "30b_a3b": (2048, 48, 32, 4, 6144, 768),
    "235b_a22b": (4096, 94, 64, 4, 12288, 1536),
}
MAX_POSITIONS = 40960


def qwen3_moe_args(size: str, router_aux_loss_coef: float = 0.001, use_grouped_gemm: bool = True,
                   **overrides: Any) -> Qwen3Args:
    dim, n_layers, n_heads, n_kv_heads, hidden_dim, moe_hidden_dim = SIZES[size]
    fields: dict[str, Any] = dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=128, hidden_dim=hidden_dim,
        vocab_size=151936, rope_theta=1_000_000.0, norm_eps=1e-6, max_seq_len=MAX_POSITIONS,
        tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_hidden_dim=moe_hidden_dim,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=float(router_aux_loss_coef),
        moe_backend="grouped_mm" if use_grouped_gemm else "loop",
    )
    fields.update(overrides)
    return Qwen3Args(**fields)


def qwen3_30b_a3b(router_aux_loss_coef: float = 0.001, use_grouped_gemm: bool = True,
                  **overrides: Any) -> Qwen3MoeTransformer:
    """Qwen3-30B-A3B: 48 layers, hidden 2048, 32/4 heads, 128 experts of width 768, top-8."""
    return Qwen3MoeTransformer(qwen3_moe_args("30b_a3b", router_aux_loss_coef, use_grouped_gemm, **overrides))


def qwen3_235b_a22b(router_aux_loss_coef: float = 0.001, use_grouped_gemm: bool = True,
                    **overrides: Any) -> Qwen3MoeTransformer:
    """Qwen3-235B-A22B: 94 layers, hidden 4096, 64/4 heads, 128 experts of width 1536, top-8."""
    return Qwen3MoeTransformer(qwen3_moe_args("235b_a22b", router_aux_loss_coef, use_grouped_gemm, **overrides))


def qwen3_moe(**args: Any) -> Qwen3MoeTransformer:
    """A Qwen3-MoE of any shape, from :class:`Qwen3Args` fields (tiny CPU models); ``use_grouped_gemm`` accepted."""
    if "use_grouped_gemm" in args:
        args.setdefault("moe_backend", "grouped_mm" if args.pop("use_grouped_gemm") else "loop")
    return Qwen3MoeTransformer(Qwen3Args(**args))


BUILDERS = {"qwen3_30b_a3b": qwen3_30b_a3b, "qwen3_235b_a22b": qwen3_235b_a22b}
