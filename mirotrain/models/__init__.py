"""Model families (``qwen3``, ``qwen3_moe``; table in ``families.py``) and their Hugging Face weights edge."""

from mirotrain.models.families import build_model
from mirotrain.models.hf_weights import from_pretrained, load_hf_weights, save_pretrained

__all__ = ["build_model", "from_pretrained", "load_hf_weights", "save_pretrained"]
