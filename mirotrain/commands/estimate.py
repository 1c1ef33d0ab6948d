"""Per-GPU (and, with CPU offload, per-node host) memory of a training config: what `mirotrain validate` prints.

FSDP2 shards the persistent state over all W ranks; everything else on a GPU is transient and scales with the
tokens it computes, T = row tokens × batch_size / SP. Bytes per GPU::

    total       = state + reference + gathered + activations + all_to_all + loss
    state       = S · N / W               S = state_bytes_per_param(cfg), by ``master_weights``: fp32 master
                                          weight, fp32 gradient and AdamW's two fp32 moments = 16; bf16 weight,
                                          gradient, moments and compensation = 10; bf16_plain 8 (on the host with
                                          fsdp_cpu_offload)
    reference   = 2 · N / W               DPO with ``reference: live``: a frozen bf16 copy sharded like the policy
                                          (``precompute`` reads the reference log-probs from the shards: 0)
    gathered    = 2 · 2 · N_layer         one decoder layer's bf16 parameters gathered, and the next prefetched
    activations = L · T · D · 2 + A       full activation checkpointing keeps each layer's bf16 input and
                                          recomputes one layer (A) in backward; without it, L · A
    A           = T · (12·D + 6·H·hd + 4·F) · 2     one layer's bf16 activations (F: the MLP width, top-k
                                          experts' for MoE)
    all_to_all  = 2 · T · (2·H + 2·KV_sp) · hd · 2  SP > 1: Ulysses' send and receive buffers of one layer's
                                          q, k, v (KV_sp: KV heads replicated up to SP) and attention output
    loss        SFT: 2 · 1024 · V · 4     chunked linear CE: fp32 logits and their gradient (the term the 14B
                                          measurements were taken with; see MEMORY_WARN_FRACTION in validate.py)
                DPO: 8 · c · V + T · (2·D + 8)   the fused log-prob head: one chunk of c tokens' fp32 logits plus
                                          logsumexp's fp32 temporary (in backward: the fp32 logit gradient and its
                                          bf16 copy, no more), and, kept for backward, the trained positions'
                                          hidden states (bf16) with their fp32 log-sum-exp and log-prob

Why T differs between the objectives: an SFT row is ``packed_seq_len`` tokens (unpacked: ``max_seq_len``,
padded, times ``batch_size``). A DPO row holds whole pairs, each pair's chosen *and* rejected document
(``mirotrain/data/preference.py``), so it is ``packed_seq_len`` tokens, and 2 × ``max_seq_len`` where a config
leaves ``packed_seq_len`` to the shards (MiroTrain's layout of a pair); counting ``max_seq_len`` there
undercounted MiroThinker 14B DPO at 40K by half its activations (57.9 GiB estimated, ~86 real).

Left out: allocator fragmentation and compiled-kernel workspaces (measured peaks ran up to ~5% above the SFT
estimate), the embedding/LM-head root kept gathered through the step, and the gradients of a layer being
reduce-scattered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mirotrain.config.tree import TrainConfig
from mirotrain.config.validation import is_preference_builder
from mirotrain.modules.loss.logprobs import DEFAULT_CHUNK_SIZE
from mirotrain.optim.precision import MODES

GIB = 2**30
BF16 = 2
FP32 = 4
# The SFT loss term's tokens per fp32 logit chunk (kept from the calibrated estimate; the loss's own chunk is
# unembed_chunk_size, 4096 by default: GPU calibration decides whether the term should follow it).
SFT_LOSS_TOKENS = 1024


def state_bytes_per_param(cfg: TrainConfig) -> int:
    """Bytes of persistent training state per parameter, sharded over all ranks: the weight, its gradient and
    the optimizer's state, as ``master_weights`` keeps them (mirotrain/optim/precision.py): fp32 16, bf16 10,
    bf16_plain 8."""
    return MODES[cfg.run.master_weights].state_bytes


def checkpoint_bytes_per_param(cfg: TrainConfig) -> int:
    """Bytes per parameter in a step checkpoint (and in async host staging): the state less the gradient, which
    is never saved (fp32 12, bf16 8, bf16_plain 6)."""
    return MODES[cfg.run.master_weights].checkpoint_bytes


def is_preference(cfg: TrainConfig) -> bool:
    """Whether the training data are DPO pairs (``preference_dataset``)."""
    return cfg.data.dataset is not None and any(is_preference_builder(b) for b in cfg.data.dataset.builders)


def row_tokens(cfg: TrainConfig, preference: bool) -> int:
    """Tokens of one micro-batch on a data-parallel rank, before SP splits it (see the module docstring)."""
    dataset = cfg.data.dataset
    packed = dataset.packed_seq_len if dataset else None
    max_seq_len = cfg.tokenizer.max_seq_len or 4096
    if preference:
        return packed or 2 * max_seq_len
    return (packed or max_seq_len) * cfg.data.batch_size


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's terms in bytes (``gib()``: in GiB, for printing), with what they were computed from."""

    objective: str            # "sft" or "dpo"
    params: int
    row_tokens: int
    tokens_per_gpu: int
    state_bytes_per_param: int
    offload: bool
    sharded_state: int        # on the GPU (0 with offload)
    reference: int            # DPO live reference, on the GPU (0 with offload)
    gathered_params: int
    activations: int
    all_to_all: int
    loss: int
    host_state_per_rank: int  # with offload: state (+ reference) each rank keeps in host memory

    @property
    def total(self) -> int:
        return (self.sharded_state + self.reference + self.gathered_params + self.activations + self.all_to_all
                + self.loss)

    def gib(self) -> dict[str, float]:
        """Every byte term in GiB plus ``total``; counts and flags as they are."""
        counts = {"objective", "params", "row_tokens", "tokens_per_gpu", "state_bytes_per_param", "offload"}
        out = {k: (v if k in counts else v / GIB) for k, v in asdict(self).items()}
        out["total"] = self.total / GIB
        return out


def _all_to_all(args, tokens: int, sp: int) -> int:
    if sp == 1:
        return 0
    kv_sp = args.n_kv_heads * -(-sp // args.n_kv_heads)  # KV heads replicated until every SP rank has one
    return 2 * tokens * (2 * args.n_heads + 2 * kv_sp) * args.head_dim * BF16


def _loss(args, cfg: TrainConfig, tokens: int, preference: bool) -> int:
    if not preference:
        return 2 * SFT_LOSS_TOKENS * args.vocab_size * FP32
    chunk = min(cfg.model.chunk_tokens(tokens) or DEFAULT_CHUNK_SIZE, tokens)
    return 2 * chunk * args.vocab_size * FP32 + tokens * (args.dim * BF16 + 2 * FP32)


def estimate_memory(model: torch.nn.Module, cfg: TrainConfig, world_size: int) -> MemoryEstimate:
    """The per-GPU estimate of ``cfg`` with ``model`` (built on the meta device) on ``world_size`` ranks."""
    args = model.args
    n_params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.layers[0].parameters())
    sp = cfg.parallel.ulysses_sequence_parallel_size
    offload = cfg.parallel.fsdp_cpu_offload
    preference = is_preference(cfg)
    row = row_tokens(cfg, preference)
    tokens = row // sp
    per_param = state_bytes_per_param(cfg)
    state = per_param * n_params // world_size
    reference = BF16 * n_params // world_size if preference and cfg.dpo.reference == "live" else 0
    ffn = args.moe_hidden_dim * args.num_experts_per_tok if args.is_moe else args.hidden_dim
    per_layer_full = tokens * (12 * args.dim + 3 * args.n_heads * args.head_dim * 2 + 4 * ffn) * BF16
    if cfg.model.enable_activation_checkpointing:
        activations = args.n_layers * tokens * args.dim * BF16 + per_layer_full
    else:
        activations = args.n_layers * per_layer_full
    return MemoryEstimate(
        objective="dpo" if preference else "sft", params=n_params, row_tokens=row, tokens_per_gpu=tokens,
        state_bytes_per_param=per_param, offload=offload,
        sharded_state=0 if offload else state, reference=0 if offload else reference,
        gathered_params=2 * BF16 * layer_params, activations=activations,
        all_to_all=_all_to_all(args, tokens, sp), loss=_loss(args, cfg, tokens, preference),
        host_state_per_rank=state + reference if offload else 0,
    )


def checkpoint_footprint(model: torch.nn.Module, cfg: TrainConfig, world_size: int,
                         gpus_per_node: int) -> dict[str, float]:
    """Step-checkpoint sizes (GiB). On disk: ``checkpoint_bytes_per_param`` per parameter. In host memory for
    async saves, per node: each rank's dim-0 shard of those bytes per parameter (checkpoint/staging.py)."""
    per_param = checkpoint_bytes_per_param(cfg)
    size = sum(per_param * p.numel() for p in model.parameters())
    per_rank = 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        shard_numel = -(-rows // world_size) * (p.numel() // max(rows, 1))  # FSDP2 pads dim 0 to the world size
        per_rank += per_param * shard_numel
    return {"size": size / GIB, "host_per_node": per_rank * min(gpus_per_node, world_size) / GIB}
