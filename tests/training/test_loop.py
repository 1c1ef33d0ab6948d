"""The optimizer step's arithmetic, in one process (gloo, world 1) with the real loader:

* gradient accumulation of 2 micro-batches equals one batch holding both rows;
* the loss of a packed row equals the mean over its documents' trained tokens, each document run alone.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sft_helpers import TINY_MODEL, tiny_config, write_shards

from mirotrain.training.distributed import destroy_distributed
from mirotrain.training.sft import SFTTrainer


@pytest.fixture(autouse=True)
def _process_group():
    yield
    destroy_distributed()


def _train(cfg: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer = SFTTrainer(cfg)
    losses = []
    trainer.train_loader.set_epoch(0)
    it = iter(trainer.train_loader)
    for _ in range(trainer.steps_per_epoch):
        result = trainer.train_step(trainer._micro_batches(it))
        losses.append((result.loss_sum.double() / result.n_targets).item())
    weights = {k: v.full_tensor().clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    destroy_distributed()
    return losses, weights


def test_accumulating_two_micro_batches_equals_one_batch_of_both(tmp_path):
    shards = write_shards(tmp_path / "docs", n_rows=8, seq_len=24, seed=5, packed=False)
    common = dict(shuffle=False, seed=3)
    losses_ga, w_ga = _train(tiny_config(tmp_path / "ga", shards, batch_size=1, gradient_accumulation_steps=2, **common))
    losses_b2, w_b2 = _train(tiny_config(tmp_path / "b2", shards, batch_size=2, gradient_accumulation_steps=1, **common))
    assert len(losses_ga) == len(losses_b2) == 4
    np.testing.assert_allclose(losses_ga, losses_b2, rtol=0, atol=1e-5)
    for key in w_ga:
        assert (w_ga[key] - w_b2[key]).abs().max().item() <= 1e-5, key


def test_packed_row_loss_is_the_mean_over_its_documents_trained_tokens(tmp_path):
    from mirotrain.models.qwen3 import qwen3

    shards = write_shards(tmp_path / "packed", n_rows=4, seq_len=48, seed=9, packed=True)
    trainer = SFTTrainer(tiny_config(tmp_path / "run", shards, seed=21))
    trainer.train_loader.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    cu = batch.cu_seqlens.tolist()
    assert len(cu) >= 3, "the row should hold several documents"
    result = trainer.train_step([batch])
    got = (result.loss_sum.double() / result.n_targets).item()

    # Independent: the same initial weights as a plain single-device model, each document run alone, fp64 CE.
    args = {k: v for k, v in TINY_MODEL.items() if k != "_component_"}
    ref = qwen3(**args)
    ref.init_weights(seed=21)
    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in zip(cu[:-1], cu[1:]):
            ids, labels = batch.input_ids[:, a:b], batch.labels[0, a:b]
            if (labels != -100).sum() == 0:
                continue
            logits = ref(ids)[0].double()
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert int(result.n_targets.item()) == count
    assert abs(got - total / count) <= 1e-5
    trainer.close()


@pytest.mark.slow  # inductor compiles in a pool of worker processes
@pytest.mark.parametrize("mlp_tiles", [1, 3])
def test_compiled_layers_and_loss_match_eager(tmp_path, mlp_tiles):
    """compile: True (decoder layers + loss kernel, with activation checkpointing; the tiled MLP's custom ops
    inside the compiled layer) trains like eager."""
    shards = write_shards(tmp_path / "packed", n_rows=3, seq_len=48, seed=4)
    common = dict(enable_activation_checkpointing=True, mlp_tiles=mlp_tiles)
    eager, _ = _train(tiny_config(tmp_path / "eager", shards, compile=False, **common))
    compiled, _ = _train(tiny_config(tmp_path / "compiled", shards, compile=True, **common))
    np.testing.assert_allclose(eager, compiled, rtol=0, atol=1e-4)


@pytest.mark.parametrize("ac", [dict(ac_mode="full"), dict(ac_mode="selective", ac_option="attention"),
                                dict(ac_mode="selective", ac_option="op"), dict(ac_mode="selective", ac_option=2)])
def test_activation_checkpointing_modes_train_like_no_checkpointing(tmp_path, ac):
    """Every AC mode the performance work uses recomputes exactly what it dropped: the same loss curve and
    final weights as a run that keeps every activation (fp32, so any difference is a recompute bug)."""
    shards = write_shards(tmp_path / "packed", n_rows=8, seq_len=48, seed=5)
    plain = _train(tiny_config(tmp_path / "plain", shards, enable_activation_checkpointing=False))
    checkpointed = _train(tiny_config(tmp_path / "ac", shards, enable_activation_checkpointing=True, **ac))
    _assert_trained_alike(plain, checkpointed, steps=8)


def _assert_trained_alike(want: tuple, got: tuple, steps: int) -> None:
    """Two ``_train`` results: the same ``steps`` losses and final weights, to 1e-6."""
    (want_losses, want_weights), (losses, weights) = want, got
    assert len(want_losses) == steps
    np.testing.assert_allclose(want_losses, losses, rtol=0, atol=1e-6)
    for name, w in want_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting", [dict(enable_activation_checkpointing=True, mlp_tiles=3),
                                     dict(enable_activation_checkpointing=False, mlp_tiles=2)])
def test_tiled_mlps_train_like_plain_ones(tmp_path, setting):
    """``mlp_tiles`` (mirotrain/parallel/mlp_tiling.py) changes what the MLPs keep, not what they compute: the
    same loss curve and final weights as untiled MLPs, under full activation checkpointing and without it. Not
    bit for bit: the down projection and the input gradient are sums over the hidden width, split into tiles,
    so fp32 rounds them in another order. SGD, so the weights differ as much as the gradients do (Adam would
    turn a rounding difference in a gradient near zero into a full step)."""
    shards = write_shards(tmp_path / "packed", n_rows=6, seq_len=48, seed=7)
    sgd = {"_component_": "torch.optim.SGD", "lr": 0.5}
    plain = _train(tiny_config(tmp_path / "plain", shards, optimizer=sgd))
    tiled = _train(tiny_config(tmp_path / "tiled", shards, optimizer=sgd, **setting))
    _assert_trained_alike(plain, tiled, steps=6)


def test_tiled_mlps_keep_their_state_dict_keys(tmp_path):
    from mirotrain.parallel.mlp_tiling import TiledFeedForward

    shards = write_shards(tmp_path / "packed", n_rows=2, seq_len=48, seed=7)
    plain = SFTTrainer(tiny_config(tmp_path / "plain", shards))
    keys = list(plain.model.state_dict())
    plain.close()
    destroy_distributed()
    tiled = SFTTrainer(tiny_config(tmp_path / "tiled", shards, mlp_tiles=4))
    assert list(tiled.model.state_dict()) == keys
    assert all(type(layer.feed_forward) is TiledFeedForward and layer.feed_forward.tiles == 4
               for layer in tiled.model.layers)
    tiled.close()
