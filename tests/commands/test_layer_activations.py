"""The estimate's per-token activation count of a decoder layer (commands/step_memory.py:
``layer_activation_bytes``) against what a real Qwen3 layer saves for backward, counted with saved-tensor hooks
in bf16: compiled, and eager as the trainer runs it (norms recomputed: mirotrain/parallel/norm_recompute.py).
Every width differs (D, H·hd, KV·hd, F), so a tensor counted at the wrong width fails the comparison; the
per-token statistics the estimate leaves out (norm rsqrt, attention log-sum-exp: at most H numbers a token) are
left out of the count too.

Under activation checkpointing a layer keeps what its level saves (``kept_per_layer``): counted as the bytes the
CPU allocator still holds when the layer's forward returns (tests/allocations.py), less its output."""

from __future__ import annotations

import pytest
import torch

from mirotrain.commands.step_memory import Shapes, kept_per_layer, layer_activation_bytes
from mirotrain.models.qwen3.model import Qwen3Args, TransformerBlock
from mirotrain.modules.mlp import FeedForward
from mirotrain.modules.rope import RotaryEmbedding
from mirotrain.parallel.activation_checkpoint import apply_activation_checkpointing
from mirotrain.parallel.norm_recompute import apply_norm_recompute

from allocations import allocation_sizes

ARGS = Qwen3Args(vocab_size=256, dim=96, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=224,
                 max_seq_len=2048)
TOKENS = 32


def _shapes() -> Shapes:
    a = ARGS
    return Shapes(params=0, root_params=0, layer_params=0, largest_local=0, n_layers=1, dim=a.dim,
                  n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, ffn=a.hidden_dim, vocab=a.vocab_size,
                  tied=True)


def _saved_bytes_per_token(compiled: bool, recompute_norms: bool = True, block: torch.nn.Module | None = None) -> float:
    """What one bf16 decoder layer (by default a dense one of ``ARGS``) saves for backward, per token."""
    torch.manual_seed(0)
    block = block or TransformerBlock(ARGS, FeedForward(ARGS.dim, ARGS.hidden_dim)).to(torch.bfloat16)
    if recompute_norms and not compiled:
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([block])
        apply_norm_recompute(model)
    cos, sin = RotaryEmbedding(ARGS.head_dim, ARGS.rope_theta, None)(torch.arange(TOKENS)[None], torch.bfloat16)
    x = torch.randn(1, TOKENS, ARGS.dim, dtype=torch.bfloat16, requires_grad=True)
    # Parameters, the layer's input (kept by every AC mode, counted apart) and RoPE's tables (one per model).
    excluded = {t.untyped_storage().data_ptr() for t in (*block.parameters(), x, cos, sin)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes() // t.element_size() > ARGS.n_heads * TOKENS:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    forward = torch.compile(block.forward) if compiled else block.forward
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x, cos, sin).float().sum().backward()
    return sum(saved.values()) / TOKENS


def test_eager_layer_saves_what_the_estimate_counts():
    assert _saved_bytes_per_token(compiled=False) == layer_activation_bytes(_shapes(), 2, compiled=False)[0]


def test_recomputed_norms_spare_their_fp32_copies():
    """Without the recompute the three norms' fp32 copies of their inputs stay (4 bytes per element of D twice,
    H·hd and KV·hd) and one more D-wide tensor in bf16: a norm's output before its weight."""
    a = ARGS
    spared = _saved_bytes_per_token(compiled=False, recompute_norms=False) - _saved_bytes_per_token(compiled=False)
    assert spared == 4 * (2 * a.dim + (a.n_heads + a.n_kv_heads) * a.head_dim) + 2 * a.dim


@pytest.mark.slow
def test_compiled_layer_saves_what_the_estimate_counts():
    assert _saved_bytes_per_token(compiled=True) == layer_activation_bytes(_shapes(), 2, compiled=True)[0]


LEVEL_OPTIONS = {"op": (0, 1, 0), "attention": (0, 0, 1), "full": (0, 0, 0)}  # ac_mode: auto, one layer
CKPT_TOKENS = 2048  # enough that what a compiled checkpoint keeps besides (a few KiB, any length) is < 4 B a token


def _kept_bytes_per_token(level: str, compiled: bool) -> float:
    """What one checkpointed bf16 layer at ``level`` holds between its forward and backward, less its input
    (created outside) and output, per token; the second of two steps (the first compiles)."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([TransformerBlock(ARGS, FeedForward(ARGS.dim, ARGS.hidden_dim)).bfloat16()])
    if not compiled:
        apply_norm_recompute(model)
    apply_activation_checkpointing(model, "auto", LEVEL_OPTIONS[level])
    forward = torch.compile(model.layers[0]) if compiled else model.layers[0]
    cos, sin = RotaryEmbedding(ARGS.head_dim, ARGS.rope_theta, None)(torch.arange(CKPT_TOKENS)[None],
                                                                     torch.bfloat16)
    for _ in range(2):
        x = torch.randn(1, CKPT_TOKENS, ARGS.dim, dtype=torch.bfloat16, requires_grad=True)
        sizes, out = allocation_sizes(lambda: forward(x, cos, sin))
        out.float().sum().backward()
    return (sum(sizes) - out.untyped_storage().nbytes()) / CKPT_TOKENS


@pytest.mark.parametrize("level, compiled", [("op", False), ("attention", False), ("full", False),
                                             pytest.param("op", True, marks=pytest.mark.slow)],
                         ids=["op-eager", "attention-eager", "full-eager", "op-compiled"])
def test_a_checkpointed_layer_keeps_what_the_estimate_counts(level, compiled):
    """Selective ``op`` keeps its matmul and attention outputs (compiled, one D-wide projection output fewer:
    the only level where compiling changes what is kept), selective ``attention`` only the attention output (its
    inputs come back with the recomputed projections), full nothing but the input. The attention's log-sum-exp,
    fp32 per token and head, is the only thing besides (the estimate leaves it out)."""
    mode, option = ("full", None) if level == "full" else ("selective", level)
    counted = kept_per_layer(_shapes(), 2, mode, option, compiled=compiled)[0] - 2 * ARGS.dim  # less the input
    lse = 4 * ARGS.n_heads if level != "full" else 0
    assert _kept_bytes_per_token(level, compiled) == pytest.approx(counted + lse, abs=4.0)


def test_an_moe_layer_kept_whole_is_covered_by_its_dispatch_rows():
    """An eager MoE layer (top-2 of 8 experts, grouped GEMMs) keeps, besides a dense layer's count, the expert
    inputs in expert order, the outputs in slot order, a fourth row of the experts' width and the router's fp32
    input (docs/moe.md): ``Shapes.moe_dispatch`` counts three k·D rows and one k·F row, an upper bound by one
    k·D row (the reorderings keep no expert outputs). Without it the estimate counted 2/3 of what such a layer
    keeps, for every layer ``ac_mode: auto`` keeps whole."""
    from mirotrain.models.qwen3_moe.builders import qwen3_moe

    k, experts, width = 2, 8, 80
    model = qwen3_moe(vocab_size=ARGS.vocab_size, dim=ARGS.dim, n_layers=1, n_heads=ARGS.n_heads,
                      n_kv_heads=ARGS.n_kv_heads, head_dim=ARGS.head_dim, hidden_dim=ARGS.hidden_dim,
                      num_experts=experts, num_experts_per_tok=k, moe_hidden_dim=width, max_seq_len=64)
    measured = _saved_bytes_per_token(compiled=False, block=model.layers[0].to(torch.bfloat16))
    shapes = Shapes(params=0, root_params=0, layer_params=0, largest_local=0, n_layers=1, dim=ARGS.dim,
                    n_heads=ARGS.n_heads, n_kv_heads=ARGS.n_kv_heads, head_dim=ARGS.head_dim, ffn=k * width,
                    vocab=ARGS.vocab_size, tied=True, moe_dispatch=k * (3 * ARGS.dim + width))
    counted = kept_per_layer(shapes, 2, "none", None, compiled=True)[0] - 2 * ARGS.dim  # less the input
    assert 0.9 * counted <= measured <= counted
