"""Activation checkpointing's recomputation of an MoE layer leaves the router's statistics alone
(mirotrain/modules/moe/router.py, ``_recomputing_in_backward``).

The recomputation used to replace ``router.stats`` with sums whose autograd graph (everything the layer saved
up to the router) nothing ever ran, so every layer held that graph from its backward until the next forward
(~1.3 GiB per full-width 30B-A3B layer at 16K tokens). The statistics of the forward stay; the gradients equal
a model without activation checkpointing (fp32, so any difference is a recompute bug)."""

import pytest
import torch

from mirotrain.models.qwen3_moe import qwen3_moe
from mirotrain.parallel.activation_checkpoint import apply_activation_checkpointing

ARGS = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, num_experts=8,
            num_experts_per_tok=2, moe_hidden_dim=16, tie_word_embeddings=False, router_aux_loss_coef=0.01)


def _model(ac: bool) -> torch.nn.Module:
    model = qwen3_moe(**ARGS)
    model.init_weights(seed=3)
    if ac:
        apply_activation_checkpointing(model, "full")
    return model


def _step(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None
          ) -> tuple[list, dict[str, torch.Tensor]]:
    """The routers' statistics after the forward and after the backward, and the gradients."""
    loss = model.forward_hidden(tokens, token_mask=mask).float().pow(2).mean() + model.moe_aux_loss()
    stats = [moe.router.stats for moe in model.moe_layers()]
    loss.backward()
    after = [moe.router.stats for moe in model.moe_layers()]
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()}
    return [stats, after], grads


@pytest.mark.parametrize("masked", [False, True])  # with a token mask the statistics save tensors of their own
def test_recomputation_keeps_the_forward_statistics_and_the_gradients(masked):
    tokens = torch.randint(0, ARGS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(24) < 20).expand(2, 24).long() if masked else None
    _, want = _step(_model(ac=False), tokens, mask)
    (forward, after_backward), got = _step(_model(ac=True), tokens, mask)
    assert all(a is f for a, f in zip(after_backward, forward)), "a recomputation replaced router.stats"
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=0, atol=1e-6, msg=name)


def test_recomputation_keeps_no_graph_alive():
    """After the backward no tensor the recomputation saved is reachable from the model: the router's
    statistics' graph is the forward's, whose saved tensors the backward has freed."""
    model = _model(ac=True)
    tokens = torch.randint(0, ARGS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    (model.forward_hidden(tokens).float().pow(2).mean() + model.moe_aux_loss()).backward()
    for moe in model.moe_layers():
        node = moe.router.stats.prob_sum.grad_fn
        seen, stack = set(), [node]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for attr in (a for a in dir(node) if a.startswith("_saved_")):
                try:
                    value = getattr(node, attr)
                except RuntimeError:  # freed by the backward
                    continue
                if isinstance(value, torch.Tensor):
                    raise AssertionError(f"{type(node).__name__}.{attr} still holds a tensor after the backward")
            stack.extend(n for n, _ in node.next_functions)
