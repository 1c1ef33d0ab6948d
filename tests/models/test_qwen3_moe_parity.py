"""Our Qwen3-MoE against transformers' Qwen3MoeForCausalLM (fp32), through the HF checkpoint mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from mirotrain.models import from_pretrained, save_pretrained
from mirotrain.models.hf_config import args_from_hf_config
from mirotrain.models.qwen3_moe import qwen3_30b_a3b

TOL = 1e-5


def scaled_down(**overrides) -> dict:
    """30B-A3B structure (head ratio 8:1, untied, norm_topk_prob) at 3 layers, width 64, 16 experts, top-4."""
    with torch.device("meta"):
        a = qwen3_30b_a3b().args
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=a.n_heads // 4, num_key_value_heads=a.n_kv_heads // 4, head_dim=16,
               num_experts=16, num_experts_per_tok=4, norm_topk_prob=a.norm_topk_prob, decoder_sparse_step=1,
               mlp_only_layers=[], rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
               max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_word_embeddings,
               router_aux_loss_coef=0.02, output_router_logits=True)
    cfg.update(overrides)
    return cfg


CONFIGS = {
    "30b_a3b_shape": scaled_down(),
    "dense_layer_no_norm_topk": scaled_down(mlp_only_layers=[1], norm_topk_prob=False),
    "sparse_step_2_tied": scaled_down(decoder_sparse_step=2, num_hidden_layers=4, tie_word_embeddings=True),
}


def random_hf_model(cfg: dict, seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norms so the q/k-norm-before-RoPE order matters
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # decisive routing: no near-ties for rounding to flip
                p.normal_(0.0, 0.5)
    return model


def save_hf(model: Qwen3MoeForCausalLM, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_aux_loss_match_transformers(name, backend, tmp_path):
    cfg = CONFIGS[name]
    hf = random_hf_model(cfg)
    ours = from_pretrained(save_hf(hf, tmp_path), moe_backend=backend).eval()
    assert [type(layer.feed_forward).__name__ for layer in ours.layers] == [
        "MoE" if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" else "FeedForward" for layer in hf.model.layers]
    ids = torch.randint(0, cfg["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = hf(input_ids=ids, output_router_logits=True)
        logits = ours(ids)
    assert (logits - expected.logits).abs().max().item() <= TOL
    aux, _ = ours.router_losses()
    assert abs(aux.item() - expected.aux_loss.item()) <= TOL
    assert abs(ours.moe_aux_loss().item() - cfg["router_aux_loss_coef"] * expected.aux_loss.item()) <= TOL


def test_packed_row_equals_documents_alone(tmp_path):
    """Packed logits equal each document run alone; the aux loss equals HF's over all documents' tokens."""
    cfg = CONFIGS["dense_layer_no_norm_topk"]
    hf = random_hf_model(cfg, seed=1)
    ours = from_pretrained(save_hf(hf, tmp_path)).eval()
    lengths = [17, 5, 26]
    docs = [torch.randint(0, cfg["vocab_size"], (1, n)) for n in lengths]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, 17, 22, 48], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=26)
        alone = [hf(input_ids=doc, output_router_logits=True) for doc in docs]
    start = 0
    for out, n in zip(alone, lengths):
        assert (packed[:, start:start + n] - out.logits).abs().max().item() <= TOL
        start += n
    # router logits of every MoE layer, documents concatenated along tokens = the packed row's tokens
    per_layer = tuple(torch.cat(layer_logits) for layer_logits in zip(*(out.router_logits for out in alone)))
    expected_aux = load_balancing_loss_func(per_layer, cfg["num_experts"], cfg["num_experts_per_tok"])
    aux, _ = ours.router_losses()
    assert abs(aux.item() - expected_aux.item()) <= TOL


def test_token_mask_matches_hf_attention_mask(tmp_path):
    """Right-padded batch: our token_mask excludes padding from router stats as HF's attention_mask does."""
    cfg = CONFIGS["30b_a3b_shape"]
    hf = random_hf_model(cfg, seed=2)
    ours = from_pretrained(save_hf(hf, tmp_path)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 19:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
        logits = ours(ids, token_mask=mask)
    real = mask.bool()
    assert (logits[real] - expected.logits[real]).abs().max().item() <= TOL
    aux, _ = ours.router_losses()
    assert abs(aux.item() - expected.aux_loss.item()) <= TOL
    stats = ours.expert_load_stats()
    n_moe = len(ours.moe_layers())
    assert stats["moe/layer_0/mean_load"] == pytest.approx(real.sum().item() * cfg["num_experts_per_tok"] / cfg["num_experts"])
    assert len([k for k in stats if k.endswith("/max_load")]) == n_moe


def test_z_loss_and_gradient(tmp_path):
    """z-loss = mean over layers and tokens of logsumexp(router logits)^2; aux loss has router gradients."""
    cfg = CONFIGS["30b_a3b_shape"]
    hf = random_hf_model(cfg, seed=3)
    ours = from_pretrained(save_hf(hf, tmp_path), router_z_loss_coef=0.1)
    ids = torch.randint(0, cfg["vocab_size"], (1, 24))
    with torch.no_grad():
        router_logits = hf(input_ids=ids, output_router_logits=True).router_logits
    ours(ids)
    aux, z = ours.router_losses()
    expected_z = torch.cat(router_logits).logsumexp(-1).square().mean()
    assert abs(z.item() - expected_z.item()) <= TOL
    total = ours.moe_aux_loss()
    assert abs(total.item() - (cfg["router_aux_loss_coef"] * aux + 0.1 * z).item()) <= TOL
    total.backward()
    assert ours.layers[0].feed_forward.router.weight.grad.abs().sum() > 0


def test_hf_round_trip_bitwise(tmp_path):
    """transformers save -> our load -> our save (several shards) -> transformers load, bit for bit."""
    cfg = CONFIGS["dense_layer_no_norm_topk"]
    hf = random_hf_model(cfg, seed=4)
    save_hf(hf, tmp_path / "a")
    ours = from_pretrained(tmp_path / "a")
    save_pretrained(ours, tmp_path / "b", dtype=torch.float32, max_shard_size=60_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()

    def keys_on_disk(d: Path) -> set[str]:
        names = set()
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                names |= set(h.keys())
        return names

    # on disk both are per-expert tensors (transformers 5 fuses experts in memory only)
    assert keys_on_disk(tmp_path / "a") == keys_on_disk(tmp_path / "b")
    assert "model.layers.0.mlp.experts.15.down_proj.weight" in keys_on_disk(tmp_path / "b")
    back = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    assert back.config.num_experts == cfg["num_experts"] and back.config.mlp_only_layers == [1]
    assert back.config.norm_topk_prob is False
    original = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = torch.randint(0, cfg["vocab_size"], (1, 32))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_reads_transformers5_config():
    config = Qwen3MoeConfig(**scaled_down()).to_dict()
    config.pop("num_experts", None)
    assert args_from_hf_config(config).num_experts == 16


def test_training_forward_leaves_collated_padding_out_of_the_aux_loss(tmp_path):
    """The trainer's forward (collate_packed -> forward_hidden) gives the same aux loss for a row padded to
    packed_seq_len as for the row without padding; without the mask the padding would shift it."""
    import numpy as np

    from mirotrain.data.collate import collate_packed
    from mirotrain.training.forward import forward_hidden

    cfg = CONFIGS["30b_a3b_shape"]
    ours = from_pretrained(save_hf(random_hf_model(cfg, seed=3), tmp_path)).eval()
    lengths = [9, 14]
    rng = np.random.default_rng(0)
    row = {"input_ids": rng.integers(0, cfg["vocab_size"], sum(lengths)), "labels": np.full(sum(lengths), -100),
           "position_ids": np.concatenate([np.arange(n) for n in lengths]), "seq_lens": np.array(lengths)}

    def aux_of(batch):
        with torch.no_grad():
            forward_hidden(ours, batch)
        return ours.router_losses()[0].item()

    padded = collate_packed([row], pad_id=0, packed_seq_len=40)
    unpadded = collate_packed([row], pad_id=0)
    assert aux_of(padded) == pytest.approx(aux_of(unpadded), abs=TOL)
    unmasked = padded.replace(token_mask=torch.ones_like(padded.token_mask))
    assert abs(aux_of(unmasked) - aux_of(unpadded)) > 1e-4
