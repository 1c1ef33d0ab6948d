"""Activation checkpointing as applied per layer (mirotrain/parallel/activation_checkpoint.py: ``layer_levels``).
``ac_mode: auto``'s decided option ``(keep, op, attention)`` puts each decoder layer at one level; what a level
recomputes is seen in the ops its backward runs: ``full`` reruns the layer's forward matmuls and attention,
``attention`` the matmuls but not the attention, ``op`` and ``none`` neither. Gradients equal a model without
activation checkpointing (fp32, so any difference is a recompute bug)."""

from collections import Counter

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

from mirotrain.models import build_model
from mirotrain.models.qwen3.model import Qwen3Args
from mirotrain.parallel.activation_checkpoint import apply_activation_checkpointing, layer_levels, resolve_ac

ARGS = dict(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
            tie_word_embeddings=False)
ATTENTION = "aten._scaled_dot_product_flash_attention_for_cpu.default"  # SDPA's forward on CPU
MATMUL = "aten.mm.default"


def _model(n_layers: int = ARGS["n_layers"]) -> torch.nn.Module:
    model = build_model(Qwen3Args(**{**ARGS, "n_layers": n_layers}), device="cpu")
    model.init_weights(seed=5)
    return model


class _BackwardOps(TorchDispatchMode):
    """Counts the ops run while ``backward`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.backward, self.ops = False, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.backward:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], Counter]:
    with _BackwardOps() as ops:
        loss = model(tokens).float().pow(2).mean()
        ops.backward = True
        loss.backward()
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for name, p in model.named_parameters()}
    return grads, ops.ops


TOKENS = torch.randint(0, ARGS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("option", [(1, 1, 1), (0, 2, 0), (2, 0, 1), (0, 0, 3), (3, 0, 0)])
def test_auto_puts_each_layer_at_its_level_with_the_gradients_of_no_recompute(option):
    want, _ = _grads(_model(), TOKENS)
    model = _model()
    apply_activation_checkpointing(model, "auto", option)
    levels = layer_levels("auto", option, ARGS["n_layers"])
    assert [isinstance(layer, CheckpointWrapper) for layer in model.layers] == [lv != "none" for lv in levels]
    got, _ = _grads(model, TOKENS)
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=0, atol=1e-6, msg=name)


def test_each_level_recomputes_what_it_does_not_keep():
    """One layer at each level: the matmuls and attention forwards its backward reruns beyond no recompute's."""
    _, plain = _grads(_model(1), TOKENS)
    extra = {}
    for option, level in (((0, 1, 0), "op"), ((0, 0, 1), "attention"), ((0, 0, 0), "full")):
        model = _model(1)
        apply_activation_checkpointing(model, "auto", option)
        assert layer_levels("auto", option, 1) == [level]
        _, ops = _grads(model, TOKENS)
        extra[level] = (ops[MATMUL] - plain[MATMUL], ops[ATTENTION] - plain[ATTENTION])
    # q, k, v, o, gate, up: the down projection's output is saved by nothing, and non-reentrant checkpointing
    # stops recomputing once every saved tensor is back
    matmuls = 6
    assert extra == {"op": (0, 0), "attention": (matmuls, 0), "full": (matmuls, 1)}


def test_layer_levels_of_the_set_modes():
    assert layer_levels("none", None, 3) == ["none"] * 3
    assert layer_levels("full", None, 3) == ["full"] * 3
    assert layer_levels("selective", "attention", 2) == ["attention"] * 2
    assert layer_levels("selective", 2, 4) == ["full", "none", "full", "none"]
    assert layer_levels("auto", (1, 0, 2), 5) == ["none", "attention", "attention", "full", "full"]


def test_auto_is_left_for_the_memory_plan_to_decide():
    assert resolve_ac(True, "auto", None) == ("auto", None)
    assert resolve_ac(False, "auto", None) == ("auto", None)


def test_the_selective_policies_keep_the_attention_of_every_backend():
    """Packed rows on GPUs run torch's varlen custom op or flash-attn's (mirotrain/modules/attention.py), one
    document cuDNN through SDPA: both selective options keep each one's output, ``op`` the matmuls' too."""
    import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)
    from torch.utils.checkpoint import CheckpointPolicy

    from mirotrain.parallel.activation_checkpoint import _SAVE_OPS, _policy

    attention = [torch.ops.torch_attn._varlen_attn.default, torch.ops.aten._scaled_dot_product_cudnn_attention.default,
                 torch.ops.aten._scaled_dot_product_flash_attention.default]
    for option in ("op", "attention"):
        for op in attention:
            assert _policy(_SAVE_OPS[option], None, op) == CheckpointPolicy.MUST_SAVE, (option, op)
        assert {"flash_attn::_flash_attn_varlen_forward", "flash_attn::_flash_attn_forward"} <= _SAVE_OPS[option]
    assert _policy(_SAVE_OPS["op"], None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert _policy(_SAVE_OPS["attention"], None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("option", [(2, 2, 1), (-1, 1, 0)])
def test_auto_counts_that_do_not_fit_the_layers_are_refused(option):
    with pytest.raises(ValueError, match="do not fit 4 layers"):
        layer_levels("auto", option, 4)
