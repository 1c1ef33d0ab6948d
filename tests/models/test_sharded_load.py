"""Each FSDP rank reads only its own rows of the HF tensors; the gathered result equals a plain load."""

import pytest
import torch

from gloo_ranks import run_on_gloo_ranks
from mirotrain.models import build_model, from_pretrained, load_hf_weights, save_pretrained
from mirotrain.models.qwen3 import qwen3
from mirotrain.models.qwen3.model import Qwen3Args

pytestmark = pytest.mark.slow  # 2 processes in one gloo group


def _worker(rank: int, world: int, ckpt: str, out: str):
    from torch.distributed.fsdp import fully_shard

    model = build_model(Qwen3Args(**ARGS), device="meta")
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    model.rope.reset_parameters()
    load_hf_weights(model, ckpt)
    save_pretrained(model, out, dtype=torch.float32)  # gathers; rank 0 writes


ARGS = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, tie_word_embeddings=False)


def test_fsdp_sharded_load_and_gathered_save(tmp_path):
    reference = qwen3(**ARGS)
    reference.init_weights(seed=3)
    save_pretrained(reference, tmp_path / "ckpt", dtype=torch.float32)
    run_on_gloo_ranks(_worker, 2, tmp_path, str(tmp_path / "ckpt"), str(tmp_path / "out"))
    back = from_pretrained(tmp_path / "out")
    for (name, a), (_, b) in zip(reference.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
