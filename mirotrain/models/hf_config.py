"""Hugging Face ``config.json`` <-> :class:`Qwen3Args`, both ways, for the families of ``models/families.py``."""

from __future__ import annotations

from typing import Any

import torch

from mirotrain.models.families import FAMILIES
from mirotrain.models.qwen3.model import Qwen3Args


def args_from_hf_config(config: dict[str, Any], **overrides: Any) -> Qwen3Args:
    """Model args from an HF ``config.json`` dict (``model_type`` qwen3 or qwen3_moe); ``overrides`` win."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported (expected one of {tuple(FAMILIES)})")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or None
    theta = config.get("rope_theta") or (rope or {}).get("rope_theta") or 1_000_000.0
    if rope is not None:
        rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
    fields: dict[str, Any] = dict(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_seq_len=config.get("max_position_embeddings", 40960),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), rope_scaling=rope,
    )
    if model_type == "qwen3_moe":
        fields.update(
            # published Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts
            num_experts=config.get("num_experts") or config["num_local_experts"], num_experts_per_tok=config["num_experts_per_tok"],
            moe_hidden_dim=config["moe_intermediate_size"], norm_topk_prob=config.get("norm_topk_prob", True),
            decoder_sparse_step=config.get("decoder_sparse_step", 1), mlp_only_layers=list(config.get("mlp_only_layers") or []),
            router_aux_loss_coef=config.get("router_aux_loss_coef", 0.001),
        )
    fields.update(overrides)
    return Qwen3Args(**fields)


# Special token ids of a model trained from random initialisation: those of the published Qwen3 chat models.
RANDOM_INIT_TOKEN_IDS: dict[str, Any] = {"bos_token_id": 151643, "eos_token_id": 151645}
# Ids a trained model must keep from its base checkpoint: Qwen3-*-Base checkpoints end documents with
# <|endoftext|> (151643), the chat models with <|im_end|> (151645); serving stops on this id.
BASE_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids(base_config: dict[str, Any] | None) -> dict[str, Any]:
    """The special token ids of an export: those the base checkpoint's config.json names (as written: an
    ``eos_token_id`` may be a list), or the chat models' for a random initialisation."""
    if base_config is None:
        return dict(RANDOM_INIT_TOKEN_IDS)
    return {k: base_config[k] for k in BASE_TOKEN_ID_KEYS if k in base_config}


def hf_config_from_args(args: Qwen3Args, dtype: torch.dtype = torch.bfloat16,
                        base_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json in the layout of the published Qwen3 checkpoints (read by transformers and vLLM), with the
    special token ids of ``base_config`` (the base checkpoint's config.json; None: random initialisation)."""
    config: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if args.is_moe else "Qwen3ForCausalLM"],
        "model_type": args.model_type,
        "attention_bias": False, "attention_dropout": 0.0,
        **token_ids(base_config),
        "head_dim": args.head_dim, "hidden_act": "silu", "hidden_size": args.dim,
        "initializer_range": 0.02, "intermediate_size": args.hidden_dim,
        "max_position_embeddings": args.max_seq_len, "max_window_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads, "rms_norm_eps": args.norm_eps,
        "rope_scaling": dict(args.rope_scaling) if args.rope_scaling else None,
        "rope_theta": args.rope_theta, "sliding_window": None, "use_sliding_window": False,
        "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True, "vocab_size": args.vocab_size,
    }
    if args.is_moe:
        config.update(
            num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
            moe_intermediate_size=args.moe_hidden_dim, norm_topk_prob=args.norm_topk_prob,
            decoder_sparse_step=args.decoder_sparse_step, mlp_only_layers=list(args.mlp_only_layers),
            router_aux_loss_coef=args.router_aux_loss_coef, output_router_logits=False,
        )
    return config
