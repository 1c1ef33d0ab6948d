"""``ac_mode: auto`` as applied (mirotrain/parallel/activation_checkpoint.py, option K from the memory plan): the
first K decoder layers keep their activations, the others are recomputed; gradients equal a model without
activation checkpointing (fp32, so any difference is a recompute bug)."""

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from mirotrain.models import build_model
from mirotrain.models.qwen3.model import Qwen3Args
from mirotrain.parallel.activation_checkpoint import apply_activation_checkpointing, resolve_ac

ARGS = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
            tie_word_embeddings=False)


def _model() -> torch.nn.Module:
    model = build_model(Qwen3Args(**ARGS), device="cpu")
    model.init_weights(seed=5)
    return model


def _grads(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model(tokens).float().pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kept", [1, 2])
def test_auto_keeps_the_first_k_layers_and_recomputes_the_rest(kept):
    tokens = torch.randint(0, ARGS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    want = _grads(_model(), tokens)
    model = _model()
    apply_activation_checkpointing(model, "auto", kept)
    wrapped = [isinstance(layer, CheckpointWrapper) for layer in model.layers]
    assert wrapped == [False] * kept + [True] * (ARGS["n_layers"] - kept)
    got = {name.replace("._checkpoint_wrapped_module", ""): g for name, g in _grads(model, tokens).items()}
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=0, atol=1e-6, msg=name)


def test_auto_is_left_for_the_memory_plan_to_decide():
    assert resolve_ac(True, "auto", None) == ("auto", None)
    assert resolve_ac(False, "auto", None) == ("auto", None)
