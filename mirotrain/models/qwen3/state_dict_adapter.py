"""Qwen3 (dense) parameter names: native <-> Hugging Face (``Qwen3ForCausalLM``); every tensor maps 1:1.

    native                              Hugging Face
    tok_embeddings.weight               model.embed_tokens.weight
    layers.{l}.attention.wq.weight      model.layers.{l}.self_attn.q_proj.weight   (wk, wv, wo, q_norm, k_norm alike)
    layers.{l}.attention_norm.weight    model.layers.{l}.input_layernorm.weight
    layers.{l}.ffn_norm.weight          model.layers.{l}.post_attention_layernorm.weight
    layers.{l}.feed_forward.w1.weight   model.layers.{l}.mlp.gate_proj.weight      (w3: up_proj, w2: down_proj)
    norm.weight                         model.norm.weight
    output.weight                       lm_head.weight   (absent from tied checkpoints)
"""

from __future__ import annotations

import re

from mirotrain.models.state_dict_adapter import HFPart, StateDictAdapter

LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


class Qwen3StateDictAdapter(StateDictAdapter):
    """The dense Qwen3 mapping (table in the module docstring)."""

    def hf_parts(self, native: str, shape: tuple[int, ...]) -> list[HFPart]:
        rows = shape[0] if shape else 0
        if native in TOP_KEYS:
            return [HFPart(TOP_KEYS[native], rows)]
        m = LAYER_RE.match(native)
        if m and m.group(2) in LAYER_KEYS:
            return [HFPart(f"model.layers.{m.group(1)}.{LAYER_KEYS[m.group(2)]}", rows)]
        raise KeyError(f"no Hugging Face name for parameter {native!r}")
