"""Full-size builders: exact parameter counts on the meta device, yarn frequencies and validation."""

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mirotrain.models.qwen3 import PLAIN_BUILDERS, YARN_BUILDERS
from mirotrain.modules.rope import RotaryEmbedding

# (dim, layers, heads, kv_heads, intermediate, tied) from the published Qwen/Qwen3-* config.json files
PUBLISHED = {
    "0_6b": (1024, 28, 16, 8, 3072, True), "1_7b": (2048, 28, 16, 8, 6144, True),
    "4b": (2560, 36, 32, 8, 9728, True), "8b": (4096, 36, 32, 8, 12288, False),
    "14b": (5120, 40, 40, 8, 17408, False), "32b": (5120, 64, 64, 8, 25600, False),
}


def expected_params(dim, layers, heads, kv, inter, tied, vocab=151936, hd=128):
    """Derivation: embedding V·D (+ separate LM head V·D if untied) + final norm D +
    per layer: q D·H·hd, k and v 2·D·KV·hd, o H·hd·D, q/k norms 2·hd, SwiGLU 3·D·I, two norms 2·D."""
    per_layer = dim * heads * hd + 2 * dim * kv * hd + heads * hd * dim + 2 * hd + 3 * dim * inter + 2 * dim
    return vocab * dim * (1 if tied else 2) + dim + layers * per_layer


def size_of(name: str) -> str:
    return name.removeprefix("qwen3_").removesuffix("_yarn").removesuffix("_base").removesuffix("_instruct")


@pytest.mark.parametrize("name", sorted(PLAIN_BUILDERS))
def test_param_count_matches_published_config(name):
    with torch.device("meta"):
        model = PLAIN_BUILDERS[name]()
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_params(*PUBLISHED[size_of(name)])
    if name == "qwen3_8b_instruct":
        assert count == 8_190_735_360


@pytest.mark.parametrize("name", sorted(YARN_BUILDERS))
def test_yarn_builders_build_on_meta(name):
    with torch.device("meta"):
        model = YARN_BUILDERS[name](163840, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 40960})
    assert sum(p.numel() for p in model.parameters()) == expected_params(*PUBLISHED[size_of(name)])
    assert model.args.max_seq_len == 163840


@pytest.mark.parametrize("original", [32768, 40960])
def test_yarn_inv_freq_and_scaling_bit_identical_to_transformers(original):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original}
    cfg = Qwen3Config(head_dim=128, num_attention_heads=32, hidden_size=4096, rope_theta=1e6,
                      max_position_embeddings=original * 4, rope_scaling=dict(scaling))
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, torch.device("cpu"))
    ours = RotaryEmbedding(128, 1e6, scaling)
    assert torch.equal(ours.inv_freq, hf_inv_freq)
    assert ours.attention_scaling == hf_scale


def test_yarn_changes_frequencies_only_past_the_ramp():
    plain = RotaryEmbedding(128, 1e6)
    yarn = RotaryEmbedding(128, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert torch.equal(plain.inv_freq[:23], yarn.inv_freq[:23])  # low = 23 for L=32768
    assert torch.allclose(plain.inv_freq[41:] / 4, yarn.inv_freq[41:])  # high = 40


@pytest.mark.parametrize("scaling,max_pos,error,match", [
    ({"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072, ValueError, "must be 'yarn'"),
    ({"factor": 4.0, "original_max_position_embeddings": 32768}, 131072, KeyError, "rope_type is required"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 32768}, 131072, KeyError, "factor is required"),
    ({"rope_type": "yarn", "factor": 4.0}, 131072, KeyError, "original_max_position_embeddings is required"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 163840, ValueError, "must equal"),
])
def test_yarn_validation_errors(scaling, max_pos, error, match):
    with torch.device("meta"), pytest.raises(error, match=match):
        YARN_BUILDERS["qwen3_8b_instruct_yarn"](max_pos, scaling)
