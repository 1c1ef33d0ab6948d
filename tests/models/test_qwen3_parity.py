"""Our Qwen3 against transformers' Qwen3ForCausalLM, through the HF checkpoint mapping."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from mirotrain.models import from_pretrained, save_pretrained
from mirotrain.models.qwen3 import PLAIN_BUILDERS, YARN_BUILDERS

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def scaled_down(builder_name: str) -> dict:
    """Same structure as the full-size builder (tying, head ratio, yarn), 2 layers, small width."""
    yarn = builder_name.endswith("_yarn")
    with torch.device("meta"):
        full = (YARN_BUILDERS[builder_name](131072, YARN) if yarn else PLAIN_BUILDERS[builder_name]())
    a = full.args
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=a.n_heads // 4, num_key_value_heads=a.n_kv_heads // 4, head_dim=32,
               rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
               tie_word_embeddings=a.tie_word_embeddings)
    if yarn:
        cfg["rope_scaling"] = dict(YARN)
    return cfg


def random_hf_model(cfg: dict, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()
    with torch.no_grad():  # non-trivial norm weights so q/k-norm-before-RoPE order matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("builder", sorted(PLAIN_BUILDERS) + sorted(YARN_BUILDERS))
def test_logits_match_transformers(builder, tmp_path):
    cfg = scaled_down(builder)
    hf = random_hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    assert ours.args.tie_word_embeddings == cfg["tie_word_embeddings"]
    ids = torch.randint(0, cfg["vocab_size"], (2, 48))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("builder", ["qwen3_8b_instruct", "qwen3_4b_base_yarn"])
def test_packed_row_equals_documents_alone(builder, tmp_path):
    cfg = scaled_down(builder)
    hf = random_hf_model(cfg, seed=1)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    lengths = [17, 5, 26]
    docs = [torch.randint(0, cfg["vocab_size"], (1, n)) for n in lengths]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, 17, 22, 48], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=26)
        start = 0
        for doc, n in zip(docs, lengths):
            alone_hf = hf(input_ids=doc).logits
            assert (packed[:, start:start + n] - alone_hf).abs().max().item() <= 1e-5
            start += n


@pytest.mark.parametrize("builder", ["qwen3_0_6b_base", "qwen3_8b_base", "qwen3_8b_instruct_yarn"])
def test_hf_round_trip_bitwise(builder, tmp_path):
    """transformers save -> our load -> our save -> transformers load: tied, untied and yarn."""
    cfg = scaled_down(builder)
    hf = random_hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path / "a")
    ours = from_pretrained(tmp_path / "a")
    save_pretrained(ours, tmp_path / "b", dtype=torch.float32, max_shard_size=40_000)  # force several shards
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    back = Qwen3ForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings == cfg["tie_word_embeddings"]
    assert back.config.max_position_embeddings == cfg["max_position_embeddings"]
    if "rope_scaling" in cfg:
        assert back.config.rope_parameters["rope_type"] == "yarn"
        assert back.config.rope_parameters["factor"] == 4.0
    original = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = torch.randint(0, cfg["vocab_size"], (1, 32))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, hf(input_ids=ids).logits)
