"""What is live on one GPU at each moment of a training step that can be its peak (``estimate.py`` takes the
largest). Every term is counted from the model's shapes and the config; none is fitted per case.

Notation (bytes unless said): N parameters, N_root those outside the decoder layers (embedding, final norm and
LM head: FSDP2's root unit), N_layer one decoder layer's (its experts divided by expert parallelism), W ranks
(FSDP2 shards over all of them), T tokens a GPU computes per micro-batch, L layers, D model width,
V vocabulary, c the compute dtype's bytes (2 for bf16), g a gradient's bytes (4 with fp32 masters, 2 in the
bf16 modes; FSDP2 reduce-scatters in that dtype), S the state's bytes per parameter (weight, gradient and
optimizer state, by ``master_weights``).

Why these moments (GA 1; gradients are set to None after every optimizer step, mirotrain/training/trainer.py):

* the loss in the forward: the end of the policy's forward, inside the loss. The weights and moments are there,
  no gradient yet (with gradient accumulation > 1 the earlier micro-batches' gradients are); the root stays
  gathered (mirotrain/parallel/fsdp.py), two decoder layers are gathered (the one running and the prefetched
  one; every layer with ``fsdp_reshard_after_forward: False``, which keeps them gathered until their backward), every layer's kept activations are live, and the LM-head loss allocates its transients
  (``loss_transient``).
* the start / the end of the backward: recomputing and differentiating the last / the first decoder layer. In
  between, each layer adds its sharded gradient (g·N_layer/W) and frees its kept input (T·D·c), so the larger of
  the two ends bounds the backward. Live besides the state: the root gathered, the LM head's unsharded gradient
  (the root is reduce-scattered only after the embedding's backward), the layer's own recomputed activations
  and their gradients (``layer_activation_bytes``), its gathered parameters and unsharded gradient, the
  prefetched layer, and the previous layer's reduce-scatter input (FSDP2 keeps it until the next reduce).
* the root's reduce-scatter: every decoder layer's sharded gradient is there; the root's unsharded gradients are
  copied into a reduce-dtype buffer (g·N_root) and reduced into a sharded one.
* the optimizer step: the whole state, plus what the optimizer allocates (``optimizer_transient``).

With ``fsdp_cpu_offload`` the sharded state and the optimizer live on the host: the GPU keeps the gathered
root and layers, the unsharded gradients and reduce buffers (the reduce-scatter output is copied to the host
after it lands) and all activations: its peak is the loss in the forward or the backward.

With ``optimizer_state_offload`` (``master_weights: bf16``) the optimizer's moments and compensation (6 of S = 10)
live on the host and only the weights and gradients (4) stay sharded on the GPU; the optimizer step streams the
state through the GPU chunk by chunk (``optimizer_transient``).

With ``enable_activation_offloading`` the tensors each layer keeps from its forward to its backward go to pinned
host memory (mirotrain/training/objectives.py: ``offloading``) and come back one layer at a time, when its
backward needs them; what the backward recomputes stays on the GPU (the running layer's terms are unchanged).

Calibrated on 2× H200 against allocator peaks (docs/benchmarks.md, "`mirotrain validate`'s memory estimate
against measured peaks"; tests/commands/test_estimate_calibration.py keeps the six rows).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mirotrain.optim.bf16_adamw import CHUNK_ELEMENTS
from mirotrain.optim.precision import runs_fused
from mirotrain.parallel.activation_checkpoint import layer_levels

FP32 = 4


@dataclass(frozen=True)
class Shapes:
    """The model's sizes the estimate needs (see the module docstring's notation)."""

    params: int
    root_params: int
    layer_params: int          # one decoder layer as gathered: its experts divided by expert parallelism
    largest_local: int         # the largest parameter's elements on one rank (FSDP2 shards dim 0 over W)
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int                   # the MLP width a token runs through (top-k experts' for MoE)
    vocab: int
    tied: bool
    moe_dispatch: int = 0      # MoE: elements per token a layer's dispatch saves beyond a dense MLP of width ffn

    @classmethod
    def of(cls, model: torch.nn.Module, world_size: int, ep: int) -> "Shapes":
        args = model.args
        layer = model.layers[0]
        experts = getattr(getattr(layer, "feed_forward", None), "experts", None)
        expert_params = sum(p.numel() for p in experts.parameters()) if experts is not None else 0
        layer_params = sum(p.numel() for p in layer.parameters()) - expert_params + expert_params // ep
        params = sum(p.numel() for p in model.parameters())
        all_layers = sum(p.numel() for p in model.layers.parameters())
        largest = max(-(-p.shape[0] // world_size) * (p.numel() // max(p.shape[0], 1)) if p.dim() else 1
                      for p in model.parameters())
        ffn = args.moe_hidden_dim * args.num_experts_per_tok if args.is_moe else args.hidden_dim
        # docs/moe.md, "What validate's estimate leaves out for MoE": three k·D rows and one more k·F row
        dispatch = args.num_experts_per_tok * (3 * args.dim + args.moe_hidden_dim) if args.is_moe else 0
        return cls(params=params, root_params=params - all_layers, layer_params=layer_params,
                   largest_local=largest, n_layers=args.n_layers, dim=args.dim, n_heads=args.n_heads,
                   n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, ffn=ffn, vocab=args.vocab_size,
                   tied=bool(args.tie_word_embeddings), moe_dispatch=dispatch)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.dim


@dataclass(frozen=True)
class Terms:
    """The bytes live at one moment, by kind (what validate's ``memory/GPU:`` line prints)."""

    sharded_state: int = 0     # sharded weights, optimizer state and the gradients produced so far
    reference: int = 0         # DPO ``reference: live``: the frozen bf16 copy, sharded like the policy
    gathered_params: int = 0   # the root and the decoder layers gathered for compute
    activations: int = 0       # kept activations, and the running layer's recomputed ones with their gradients
    all_to_all: int = 0        # Ulysses' send and receive buffers (SP > 1)
    loss: int = 0              # the LM-head loss's transients
    buffers: int = 0           # unsharded gradients, reduce-scatter buffers, the optimizer's temporaries

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


# ------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(s: Shapes, c: int, mlp_tiles: int = 1, compiled: bool = True) -> tuple[int, int]:
    """(saved, backward transient) bytes per token of one decoder layer run with autograd.

    Saved for backward, as counted on a real layer with saved-tensor hooks in bf16
    (tests/commands/test_layer_activations.py keeps the count): the two norm outputs and the residual between
    them (3·D), three tensors of q's width and three of k's (q and k as the attention kernel reads them, its
    output in both layouts, v, k's projection: 3·H·hd + 3·KV·hd), and the MLP's gate, up and their product
    (3·F); eager layers (not ``compiled``) also SiLU(gate), which Inductor recomputes (4·F). Eager layers
    recompute their norms (mirotrain/parallel/norm_recompute.py), so no fp32 copy is counted. Transient in its
    backward: the gradient of the layer's output and of the residual (2·D), and the gradients of gate, up and
    the product (3·F). Norm statistics and the attention's log-sum-exp are per token and head, negligible.

    With ``mlp_tiles`` k > 1 (mirotrain/modules/tiled_mlp.py) the MLP saves only its input (one of the norm
    outputs above) and its backward holds at most five of one tile's slices (gate, up, silu(gate) and the
    gradients of the product and of up: 5·F/k) and the fp32 input gradient it sums over the tiles (4·D bytes).
    """
    attention = 3 * s.dim + 3 * (s.n_heads + s.n_kv_heads) * s.head_dim
    mlp = (3 if compiled else 4) * s.ffn
    if mlp_tiles == 1:
        return (attention + mlp) * c, (2 * s.dim + 3 * s.ffn) * c
    return attention * c, (2 * s.dim + 5 * -(-s.ffn // mlp_tiles)) * c + FP32 * s.dim


def kept_per_layer(s: Shapes, c: int, ac_mode: str, ac_option: int | str | tuple[int, int, int] | None,
                   mlp_tiles: int = 1, compiled: bool = True) -> list[int]:
    """Bytes per token each layer keeps from its forward to its backward, by its level (mirotrain/parallel/
    activation_checkpoint.py: ``layer_levels``), as measured on a real layer (tests/commands/
    test_layer_activations.py): ``full`` its input only; ``none`` its input and everything it saves; selective
    ``op`` also the outputs of its matmuls and attention: q, k, v, the attention output, gate, up, and the down
    and output projections' (eager; compiled layers keep one D-wide of the two); selective ``attention`` only
    the attention output besides the input (the attention's inputs come back with the recomputed projections).
    The attention's log-sum-exp (a number per token and head) is left out. Tiled MLPs (``mlp_tiles`` > 1) keep
    none of their activations. An MoE layer kept whole (``none``) also keeps its dispatch's rows
    (``Shapes.moe_dispatch``), so ``ac_mode: auto`` counts them for every layer it keeps; the recomputed layer's
    are left out (docs/moe.md)."""
    saved, _ = layer_activation_bytes(s, c, mlp_tiles, compiled)
    inp = s.dim * c
    qkvo = (2 * s.n_heads + 2 * s.n_kv_heads) * s.head_dim * c
    projections = (1 if compiled else 2) * s.dim
    by_level = {"none": inp + saved + s.moe_dispatch * c, "op": inp + qkvo + (projections + 2 * s.ffn) * c,
                "attention": inp + s.n_heads * s.head_dim * c, "full": inp}
    return [by_level[level] for level in layer_levels(ac_mode, ac_option, s.n_layers)]


# ------------------------------------------------------------------------------------------- the loss head
def loss_transient(s: Shapes, c: int, tokens: int, kind: str, chunk: int) -> int:
    """The most the LM-head loss allocates at once (its forward or backward; all kept activations are live and
    no layer gradient exists yet), for ``kind``:

    * ``linear_ce`` (mirotrain/modules/loss/linear_ce.py, ``chunk`` tokens per chunk): it computes the gradients
      in its forward: the fp32 running LM-head gradient (V·D·4); for one chunk the fp32 logits, their gradient in
      the compute dtype, the chunk's LM-head gradient and its fp32 copy; the hidden states' gradient (T·D·c).
    * ``liger`` (Liger's fused kernel, chunks of ~T·D/V tokens): the LM-head and hidden gradients in the compute
      dtype and one chunk of logits.
    * ``logprobs`` (DPO, mirotrain/modules/loss/logprobs.py): forward, one chunk's fp32 logits and logsumexp's
      fp32 temporary; backward, the chunk's fp32 logit gradient with its compute-dtype copy and the LM-head and
      hidden gradients; plus the hidden states kept for backward with their fp32 log-sum-exp and log-prob.
    """
    up = FP32 if c < FP32 else 0  # a cast to fp32 copies only from a narrower dtype
    head = s.lm_head_params
    if kind == "linear_ce":
        n = min(chunk, tokens)
        return head * (FP32 + c + up) + n * s.vocab * (FP32 + (c if c < FP32 else 0)) + tokens * s.dim * c
    if kind == "liger":
        n = min(tokens, _next_power_of_2(-(-tokens // -(-s.vocab // s.dim))))  # Liger's own chunk rule
        return head * c + tokens * s.dim * c + n * s.vocab * c
    n = min(chunk, tokens)
    forward = 2 * n * s.vocab * FP32
    backward = n * s.vocab * (FP32 + c) + head * c + tokens * s.dim * c
    return max(forward, backward) + tokens * (s.dim * c + 2 * FP32)


def compensated_bytes_per_element(compiled: bool, state_offload: bool) -> int:
    """Bytes the compensated AdamW's step allocates per element of its largest chunk, beyond the state, as
    measured (tests/optim/test_optimizer_transient.py), rounded up a little:

    * compiled, state resident: 0. One kernel per parameter shard reads the weight, gradient and state and
      writes them back in place (a few scalars besides: the step's coefficients, the random seed).
    * eager, state resident: 48. The chunk's flat fp32 copies of the weights, gradients, both moments and the
      compensation (``_update``: 5 x 4 = 20); inside ``compensated_adamw_`` the fp32 new moments ``m`` and
      ``v`` (8) and ``update`` (4), still live while the new weights ``total`` (4), their bf16 rounding (2) and
      what it dropped, ``total - rounded`` (4), are computed: 42 on a GPU. On the CPU (the test) 46: its binary
      ops cast a bf16 operand to an fp32 copy first (``rounded``, 4).
    * compiled, state offloaded: 30. The flat fp32 buffers (20: offloaded chunks always take them), the next
      chunk's bf16 moments and compensation, copied in from the host meanwhile (6, counted at this chunk's
      size: the largest), and the bf16 copy of one new state buffer on its way back to the host (2): 28.
    * eager, state offloaded: 54. The eager 42 (46 on the CPU) and the next chunk's state (6): 48 (52)."""
    if compiled:
        return 30 if state_offload else 0
    return 54 if state_offload else 48


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def optimizer_transient(s: Shapes, optimizer: dict, master_weights: str, world_size: int,
                        state_offload: bool = False, compiled: bool = False) -> int:
    """What the optimizer step allocates beyond the state: fused torch Adam(W) (the engine's default for them:
    ``runs_fused``) nothing; foreach one copy of the second moments (its sqrt); the compensated AdamW of
    ``master_weights: bf16`` (mirotrain/optim/bf16_adamw.py) ``compensated_bytes_per_element`` per element of
    its largest flat chunk, a chunk being at most CHUNK_ELEMENTS or the largest parameter's local shard (the
    embedding and LM head are updated alone). ``compiled``: its step is compiled (``compile``'s optimizer_step);
    ``state_offload``: ``optimizer_state_offload``."""
    if master_weights == "bf16":
        per_element = compensated_bytes_per_element(compiled, state_offload)
        return per_element * max(min(CHUNK_ELEMENTS, s.params // world_size), s.largest_local)
    if runs_fused(optimizer):
        return 0
    moment = FP32 if master_weights == "fp32" else 2
    return moment * s.params // world_size


# ------------------------------------------------------------------------------------------- the moments
@dataclass(frozen=True)
class Step:
    """What the moments of a step depend on besides the shapes (all in bytes or tokens)."""

    tokens: int
    compute_bytes: int
    grad_bytes: int
    state_bytes: int
    world_size: int
    offload: bool
    activations_on_host: bool  # enable_activation_offloading: the kept activations live in host memory
    gathered_layers: int       # decoder layers gathered at once: 2, or all with fsdp_reshard_after_forward False
    grad_accum: int
    mlp_tiles: int             # the dense MLP's tiles (1: not tiled)
    compiled: bool             # decoder layers under torch.compile (they save fewer activations)
    reference: int
    all_to_all: int
    kept: list[int]
    loss: int
    optimizer: int
    host_state_bytes: int = 0  # of state_bytes, what stays in host memory (optimizer_state_offload: the moments)


def step_moments(s: Shapes, st: Step) -> dict[str, Terms]:
    """The terms live at each moment of the module docstring, by its name."""
    c, g, w, T = st.compute_bytes, st.grad_bytes, st.world_size, st.tokens
    on_gpu = 0 if st.offload else 1
    kept = [0] * len(st.kept) if st.activations_on_host else st.kept
    weights_and_moments = on_gpu * (st.state_bytes - st.host_state_bytes - g) * s.params // w
    all_grads = on_gpu * g * s.params // w
    layer_grads = on_gpu * g * (s.params - s.root_params) // w
    earlier_grads = all_grads if st.grad_accum > 1 else 0
    root = s.root_params * c
    layers_gathered = st.gathered_layers * s.layer_params * c
    saved, transient = layer_activation_bytes(s, c, st.mlp_tiles, st.compiled)
    running_layer = T * (s.dim * c + saved + transient)
    head_grad = s.lm_head_params * c
    layer_reduce = s.layer_params * (c + g)  # the layer's unsharded gradient, the previous one's reduce input
    common = dict(reference=on_gpu * st.reference, all_to_all=st.all_to_all)
    before_grads = dict(sharded_state=weights_and_moments + earlier_grads, gathered_params=root + layers_gathered, **common)
    return {
        "loss in the forward": Terms(activations=T * (sum(kept) + 2 * s.dim * c), loss=st.loss, **before_grads),
        "start of the backward": Terms(activations=T * sum(kept[:-1]) + running_layer,
                                       buffers=head_grad + layer_reduce, **before_grads),
        "end of the backward": Terms(sharded_state=weights_and_moments + max(layer_grads, earlier_grads),
                                     gathered_params=root + layers_gathered, activations=running_layer,
                                     buffers=head_grad + layer_reduce, **common),
        "root's reduce-scatter": Terms(sharded_state=weights_and_moments + max(layer_grads, earlier_grads),
                                       buffers=s.root_params * g + max(s.root_params * c, s.root_params * g // w),
                                       **common),
        "optimizer step": Terms(sharded_state=weights_and_moments + all_grads, buffers=on_gpu * st.optimizer,
                                **common),
    }
