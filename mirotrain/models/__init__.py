"""Model families (qwen3, qwen3_moe) and the HF checkpoint edge (``from_pretrained``/``save_pretrained``)."""

from mirotrain.models.hf import build_model, from_pretrained, load_hf_weights, save_pretrained

__all__ = ["build_model", "from_pretrained", "load_hf_weights", "save_pretrained"]
