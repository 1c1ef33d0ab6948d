"""RoPE frequencies stay fp32 whatever dtype the model is cast to (issue #19: a bf16 load rounded them)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from mirotrain.models import from_pretrained
from mirotrain.modules.rope import RotaryEmbedding

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["default", "yarn"])
def test_dtype_cast_keeps_fp32_frequencies(rope_scaling):
    fresh = RotaryEmbedding(128, 1_000_000.0, rope_scaling)
    cast = RotaryEmbedding(128, 1_000_000.0, rope_scaling).to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.float32
    assert torch.equal(cast.inv_freq, fresh.inv_freq)
    assert cast.attention_scaling == fresh.attention_scaling


def test_bf16_load_rotates_like_transformers(tmp_path):
    """cos/sin of a checkpoint loaded in bf16, out to position 4096, are transformers' bit for bit; with the
    frequencies rounded to bf16 they were up to 0.28 off by position 256 (a 30B-A3B layer's attention twice
    as far from float64 as transformers')."""
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=128, rope_theta=1_000_000.0)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16)
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    pos = torch.arange(4096).unsqueeze(0)
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    for got, want in zip(ours.rope(pos, torch.bfloat16), hf.model.rotary_emb(x, pos)):
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got, want)
