"""Qwen3-MoE parameter names: the dense Qwen3 mapping plus the router and the stacked experts.

    native                                   Hugging Face (on disk, per expert)
    layers.{l}.feed_forward.router.weight    model.layers.{l}.mlp.gate.weight
    layers.{l}.feed_forward.experts.w1       model.layers.{l}.mlp.experts.{e}.gate_proj.weight  (e = 0..E-1)
    layers.{l}.feed_forward.experts.w3       model.layers.{l}.mlp.experts.{e}.up_proj.weight
    layers.{l}.feed_forward.experts.w2       model.layers.{l}.mlp.experts.{e}.down_proj.weight

Each HF expert tensor is one row (dim 0) of the stacked native tensor, so loading reads only the experts a
rank owns (expert parallel or FSDP shard) and saving writes one expert tensor at a time.
"""

from __future__ import annotations

import re

from mirotrain.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter
from mirotrain.models.state_dict_adapter import HFPart

EXPERT_RE = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(w1|w2|w3)$")
ROUTER_RE = re.compile(r"^layers\.(\d+)\.feed_forward\.router\.weight$")
EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class Qwen3MoeStateDictAdapter(Qwen3StateDictAdapter):
    """Router and experts as in the module docstring; every other parameter as in dense Qwen3."""

    def hf_parts(self, native: str, shape: tuple[int, ...]) -> list[HFPart]:
        m = EXPERT_RE.match(native)
        if m:
            layer, proj = m.group(1), EXPERT_PROJ[m.group(2)]
            return [HFPart(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", 0) for e in range(shape[0])]
        m = ROUTER_RE.match(native)
        if m:
            return [HFPart(f"model.layers.{m.group(1)}.mlp.gate.weight", shape[0])]
        return super().hf_parts(native, shape)
