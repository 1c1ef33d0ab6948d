"""Qwen3-MoE models: builders with the names MiroTrain configs use (``mirotrain.models.qwen3_moe.qwen3_30b_a3b``)."""

from mirotrain.models.qwen3_moe.builders import BUILDERS, qwen3_30b_a3b, qwen3_235b_a22b, qwen3_moe
from mirotrain.models.qwen3_moe.model import Qwen3MoeTransformer, is_moe_layer

__all__ = ["BUILDERS", "Qwen3MoeTransformer", "is_moe_layer", "qwen3_235b_a22b", "qwen3_30b_a3b", "qwen3_moe"]
