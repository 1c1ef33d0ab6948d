"""Qwen3-MoE models: builders and the HF key mapping of the stacked expert weights.

Importing this package registers the mapping with mirotrain.models.hf, so from_pretrained /
save_pretrained / load_hf_weights handle MoE checkpoints (``model_type: qwen3_moe``):

    native                                   Hugging Face (on disk, per expert)
    layers.{l}.feed_forward.router.weight    model.layers.{l}.mlp.gate.weight
    layers.{l}.feed_forward.experts.w1       model.layers.{l}.mlp.experts.{e}.gate_proj.weight  (e = 0..E-1)
    layers.{l}.feed_forward.experts.w3       model.layers.{l}.mlp.experts.{e}.up_proj.weight
    layers.{l}.feed_forward.experts.w2       model.layers.{l}.mlp.experts.{e}.down_proj.weight

Each HF expert tensor is one row (dim 0) of the stacked native tensor, so loading reads only the experts
a rank owns (expert parallel or FSDP shard) and saving writes one expert tensor at a time.
"""

from __future__ import annotations

import re

from mirotrain.models.hf import register_key_mapper
from mirotrain.models.qwen3_moe.builders import BUILDERS, qwen3_30b_a3b, qwen3_235b_a22b, qwen3_moe
from mirotrain.models.qwen3_moe.model import Qwen3MoeTransformer, is_moe_layer

_EXPERT_RE = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(w1|w2|w3)$")
_ROUTER_RE = re.compile(r"^layers\.(\d+)\.feed_forward\.router\.weight$")
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def moe_hf_parts(native: str, shape: tuple[int, ...]) -> list[tuple[str, int]] | None:
    """HF tensors making up a native MoE parameter (``rows == 0``: one expert = one unsqueezed row)."""
    m = _EXPERT_RE.match(native)
    if m:
        layer, proj = m.group(1), _PROJ[m.group(2)]
        return [(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", 0) for e in range(shape[0])]
    m = _ROUTER_RE.match(native)
    if m:
        return [(f"model.layers.{m.group(1)}.mlp.gate.weight", shape[0])]
    return None


register_key_mapper(moe_hf_parts)

__all__ = ["BUILDERS", "Qwen3MoeTransformer", "is_moe_layer", "moe_hf_parts", "qwen3_235b_a22b", "qwen3_30b_a3b",
           "qwen3_moe"]
