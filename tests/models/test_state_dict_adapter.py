"""The state-dict adapters of models/families.py: names, the stacked experts, and reads of a row range only."""

from __future__ import annotations

import pytest
import torch

from mirotrain.models.families import FAMILIES, family_of
from mirotrain.models.qwen3_moe import qwen3_moe

MOE = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=24, num_experts=4,
           num_experts_per_tok=2, moe_hidden_dim=8, mlp_only_layers=[1], tie_word_embeddings=False)


def test_to_hf_then_from_hf_gives_the_state_dict_back_and_reads_only_the_rows_asked_for():
    model = qwen3_moe(**MOE)
    model.init_weights(seed=0)
    adapter = family_of(model.args).adapter
    assert adapter is FAMILIES["qwen3_moe"].adapter
    hf = {name: t for native, p in model.state_dict().items() for name, t in adapter.to_hf(native, p)}
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in hf and "model.layers.1.mlp.gate_proj.weight" in hf
    assert hf["model.layers.0.mlp.experts.2.gate_proj.weight"].shape == (8, 16)
    reads = []

    def read(name, rows):
        reads.append((name, rows))
        return hf[name] if rows is None else hf[name][rows[0]:rows[1]]

    for native, p in model.state_dict().items():
        assert torch.equal(adapter.from_hf(native, tuple(p.shape), read), p), native
    reads.clear()
    w1 = model.layers[0].feed_forward.experts.w1
    assert torch.equal(adapter.from_hf("layers.0.feed_forward.experts.w1", tuple(w1.shape), read, (1, 3)), w1[1:3])
    assert reads == [(f"model.layers.0.mlp.experts.{e}.gate_proj.weight", None) for e in (1, 2)]
    emb = model.tok_embeddings.weight
    assert torch.equal(adapter.from_hf("tok_embeddings.weight", tuple(emb.shape), read, (5, 9)), emb[5:9])


def test_a_parameter_without_a_hugging_face_name_is_named_in_the_error():
    with pytest.raises(KeyError, match="layers.0.feed_forward.experts.w4"):
        FAMILIES["qwen3"].adapter.hf_parts("layers.0.feed_forward.experts.w4", (4, 8, 16))
