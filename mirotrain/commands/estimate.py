"""Per-GPU (and, with CPU offload, per-node host) memory of a training config: what `mirotrain validate` prints.

The estimate is the largest of the moments of a step that can hold the peak (``step_memory.py`` says what is
live at each and why): the forward inside the LM-head loss, the start and the end of the backward, the root's
gradient reduce-scatter and the optimizer step. Each moment's bytes are split into the terms validate prints:

    sharded_state   the sharded weights and optimizer state, S·N/W less the gradients not produced yet
                    (S = state_bytes_per_param: fp32 masters 16, bf16 10, bf16_plain 8; on the host with
                    fsdp_cpu_offload; the optimizer's 6 of bf16's 10 on the host with optimizer_state_offload)
    reference       DPO ``reference: live``: a frozen bf16 copy sharded like the policy, 2·N/W (``precompute``
                    reads the reference log-probs from the shards: 0)
    gathered_params the root (embedding, final norm, LM head) gathered for the whole step, and two decoder
                    layers (the running one and the prefetched one), in the compute dtype
    activations     every layer's kept activations (full AC: its bf16 input) and the running layer's recomputed
                    activations with their gradients (``step_memory.layer_activation_bytes``)
    all_to_all      SP > 1: Ulysses' send and receive buffers of one layer's q, k, v (KV heads replicated up to
                    SP) and attention output
    loss            the LM-head loss's transients (``step_memory.loss_transient``)
    buffers         the LM head's and the running layer's unsharded gradients, reduce-scatter buffers, the
                    optimizer's temporaries

Why T differs between the objectives: an SFT row is ``packed_seq_len`` tokens (unpacked: ``max_seq_len``,
padded, times ``batch_size``). A DPO row holds whole pairs, each pair's chosen *and* rejected document
(``mirotrain/data/preference.py``), so it is ``packed_seq_len`` tokens, and 2 × ``max_seq_len`` where a config
leaves ``packed_seq_len`` to the shards (MiroTrain's layout of a pair); counting ``max_seq_len`` there
undercounted MiroThinker 14B DPO at 40K by half its activations (57.9 GiB estimated, ~86 real).

The estimate is of the allocator's peak *allocated* bytes. What an out-of-memory error sees is the reserved
bytes, which ran 14-47% higher without ``expandable_segments`` (docs/benchmarks.md); `mirotrain sft`/`dpo` set
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the environment sets it (``cuda_alloc.py``), which
keeps the reserved bytes close to the allocated ones. Left out: compiled-kernel workspaces, NCCL's own buffers.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from mirotrain.commands.step_memory import (Shapes, Step, Terms, kept_per_layer, loss_transient,
                                            optimizer_transient, step_moments)
from mirotrain.config.tree import TrainConfig
from mirotrain.config.validation import is_preference_builder
from mirotrain.modules.loss.linear_ce import DEFAULT_CHUNK_TOKENS
from mirotrain.modules.loss.logprobs import DEFAULT_CHUNK_SIZE
from mirotrain.optim.precision import MODES
from mirotrain.parallel.activation_checkpoint import LEVELS, layer_levels, resolve_ac

GIB = 2**30
BF16 = 2
# Above this fraction of a GPU's memory validate warns and ``mlp_tiles: auto`` tiles the MLP. The estimate is
# of the allocator's peak allocated bytes (docs/benchmarks.md); the 10% margin is for what the allocator reserves
# beyond them, kept small by expandable_segments (mirotrain/commands/cuda_alloc.py), and for compiled-kernel
# workspaces the estimate leaves out.
MEMORY_WARN_FRACTION = 0.9
MLP_TILE_CHOICES = (1, 2, 4, 8, 16)


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
class MemoryPlan:
    """What a run keeps of its activations, as applied: the AC mode and option (``auto`` decided: ``("auto",
    (keep, op, attention))``, how many layers run at each level before the rest, recomputed in full:
    mirotrain/parallel/activation_checkpoint.py) and the dense MLP's tiles."""

    ac_mode: str
    ac_option: int | str | tuple[int, int, int] | None
    mlp_tiles: int

    def layer_counts(self, n_layers: int) -> dict[str, int]:
        """How many of the ``n_layers`` decoder layers run at each of ``LEVELS``."""
        levels = layer_levels(self.ac_mode, self.ac_option, n_layers)
        return {level: levels.count(level) for level in LEVELS}

    def describe(self, n_layers: int) -> str:
        """The levels in words, as validate and the trainer's log print ``ac_mode: auto``'s decision."""
        words = {"none": "keep all their activations", "op": "keep their matmul and attention outputs (selective "
                 "op)", "attention": "keep their attention outputs (selective attention)",
                 "full": "keep only their input (full recompute)"}
        counts = self.layer_counts(n_layers)
        return ", ".join(f"{counts[level]} of {n_layers} layers {words[level]}" for level in LEVELS if counts[level])


@dataclass(frozen=True)
class MemoryEstimate:
    """The terms of the step's peak moment in bytes (``gib()``: in GiB, for printing), with what they were
    computed from; ``phase`` names the moment (``step_memory.py``)."""

    objective: str            # "sft" or "dpo"
    plan: MemoryPlan          # the activation plan the estimate assumes (``memory_plan``)
    params: int
    row_tokens: int
    tokens_per_gpu: int
    state_bytes_per_param: int
    offload: bool
    optimizer_offload: bool   # optimizer_state_offload: the optimizer's state in host memory
    phase: str                # the moment of the step with the most bytes live
    sharded_state: int        # on the GPU (0 with offload)
    reference: int            # DPO live reference, on the GPU (0 with offload)
    gathered_params: int
    activations: int
    all_to_all: int
    loss: int
    buffers: int
    host_state_per_rank: int  # state (+ reference) each rank keeps in host memory: all with offload, the
                              # optimizer's with optimizer_offload
    host_activations_per_rank: int  # with enable_activation_offloading: the kept activations, pinned

    @property
    def total(self) -> int:
        return (self.sharded_state + self.reference + self.gathered_params + self.activations + self.all_to_all
                + self.loss + self.buffers)

    def gib(self) -> dict[str, float]:
        """Every byte term in GiB plus ``total``; counts, flags and names as they are."""
        counts = {"objective", "plan", "params", "row_tokens", "tokens_per_gpu", "state_bytes_per_param", "offload",
                  "optimizer_offload", "phase"}
        out = {k: (v if k in counts else v / GIB) for k, v in asdict(self).items()}
        out["total"] = self.total / GIB
        return out


def _all_to_all(args, tokens: int, sp: int, compute_bytes: int) -> int:
    if sp == 1:
        return 0
    kv_sp = args.n_kv_heads * -(-sp // args.n_kv_heads)  # KV heads replicated until every SP rank has one
    return 2 * tokens * (2 * args.n_heads + 2 * kv_sp) * args.head_dim * compute_bytes


def loss_kind(cfg: TrainConfig, preference: bool) -> str:
    """Which LM-head loss the run computes: DPO's fused log-probs, Liger's kernel or the chunked linear CE."""
    if preference:
        return "logprobs"
    return "liger" if "Liger" in str((cfg.model.loss or {}).get("_component_", "")) else "linear_ce"


def loss_chunk(cfg: TrainConfig, tokens: int, preference: bool) -> int:
    """Tokens per LM-head chunk as the trainer sets it (mirotrain/training/forward.py): the model section's
    ``loss_chunk_tokens`` / ``unembed_chunk_size``, else (SFT) the loss node's ``chunk_tokens``, else the default
    (DPO's log-prob head takes no loss node: mirotrain/training/dpo.py)."""
    if preference:
        return cfg.model.chunk_tokens(tokens) or DEFAULT_CHUNK_SIZE
    return cfg.model.chunk_tokens(tokens) or int((cfg.model.loss or {}).get("chunk_tokens") or DEFAULT_CHUNK_TOKENS)


def _step(model: torch.nn.Module, cfg: TrainConfig, world_size: int, plan: MemoryPlan
          ) -> tuple[Shapes, Step, int, str]:
    """The model's shapes, what the step's moments depend on, the row's tokens and the objective (sft, dpo)."""
    args = model.args
    sp = cfg.parallel.ulysses_sequence_parallel_size
    shapes = Shapes.of(model, world_size, cfg.parallel.moe_expert_parallel_size)
    preference = is_preference(cfg)
    row = row_tokens(cfg, preference)
    tokens = row // sp
    mode = MODES[cfg.run.master_weights]
    compute = 2 if cfg.run.dtype == "bf16" else 4
    compiled, _, compiled_optimizer = cfg.model.compile_flags("cuda")  # the estimate is of a GPU run
    reference = BF16 * shapes.params // world_size if preference and cfg.dpo.reference == "live" else 0
    step = Step(
        tokens=tokens, compute_bytes=compute, grad_bytes=torch.empty((), dtype=mode.reduce_dtype).element_size(),
        state_bytes=mode.state_bytes, world_size=world_size, offload=cfg.parallel.fsdp_cpu_offload,
        activations_on_host=cfg.model.enable_activation_offloading,
        gathered_layers=2 if cfg.parallel.fsdp_reshard_after_forward else args.n_layers,
        grad_accum=cfg.optim.gradient_accumulation_steps, mlp_tiles=plan.mlp_tiles,
        compiled=compiled, reference=reference,
        all_to_all=_all_to_all(args, tokens, sp, compute),
        kept=kept_per_layer(shapes, compute, plan.ac_mode, plan.ac_option, plan.mlp_tiles, compiled),
        loss=loss_transient(shapes, compute, tokens, loss_kind(cfg, preference), loss_chunk(cfg, tokens, preference)),
        optimizer=optimizer_transient(shapes, cfg.optim.optimizer, mode.name, world_size,
                                      cfg.run.optimizer_state_offload, compiled_optimizer),
        host_state_bytes=mode.optimizer_bytes if cfg.run.optimizer_state_offload else 0)
    return shapes, step, row, "dpo" if preference else "sft"


def step_terms(model: torch.nn.Module, cfg: TrainConfig, world_size: int, plan: MemoryPlan | None = None
               ) -> dict[str, Terms]:
    """What is live on one GPU at each moment of a step that can hold its peak (``step_memory.py``), with
    ``plan`` (None: the config's own, ``auto`` decided without a GPU size)."""
    shapes, step, _, _ = _step(model, cfg, world_size, plan or memory_plan(model, cfg, world_size, None))
    return step_moments(shapes, step)


def _peak_bytes(model: torch.nn.Module, cfg: TrainConfig, world_size: int, plan: MemoryPlan) -> int:
    return max(terms.total for terms in step_terms(model, cfg, world_size, plan).values())


def settled_plan(cfg: TrainConfig, gpu_known: bool) -> MemoryPlan | None:
    """The plan where the config settles it without the model or its estimate, None where an ``auto`` setting
    is decided against the card (``memory_plan``). Settled: neither setting ``auto``; no GPU size
    (``gpu_known`` False, as on CPU), where ``ac_mode: auto`` is full AC and ``mlp_tiles: auto`` 1; and
    ``mlp_tiles: auto`` under per-op selective AC ``op`` (1: its memory with tiles is not modelled). The trainer
    asks this first, so a settled plan costs no meta model and no collective (mirotrain/training/builders.py);
    ``memory_plan`` asks it too; what is decided against a card is ``ModelConfig.plans_against_memory``."""
    if gpu_known and cfg.model.plans_against_memory():
        return None
    mode, option = resolve_ac(cfg.model.enable_activation_checkpointing, cfg.model.ac_mode, cfg.model.ac_option)
    tiles = cfg.model.planned_mlp_tiles()
    if mode == "auto":  # no GPU size
        mode, option = "full", None
    return MemoryPlan(mode, option, 1 if tiles == "auto" else int(tiles))


def memory_limit(cfg: TrainConfig, gpu_bytes: int) -> float:
    """The bytes the ``auto`` settings plan for on GPUs of ``gpu_bytes``: ``MEMORY_WARN_FRACTION`` of the card,
    or ``memory_budget_gib`` where it is set and smaller (a run sharing its GPUs, or matching another's peak)."""
    limit = MEMORY_WARN_FRACTION * gpu_bytes
    budget = cfg.model.memory_budget_gib
    return limit if budget is None else min(limit, budget * GIB)


def describe_limit(cfg: TrainConfig, gpu_bytes: int) -> str:
    """``memory_limit`` in words, for the plan's log line and validate."""
    if memory_limit(cfg, gpu_bytes) < MEMORY_WARN_FRACTION * gpu_bytes:
        return f"memory_budget_gib ({cfg.model.memory_budget_gib:g} GiB)"
    return f"{MEMORY_WARN_FRACTION:.0%} of a {gpu_bytes / GIB:.4g} GiB GPU"


def memory_plan(model: torch.nn.Module, cfg: TrainConfig, world_size: int, gpu_bytes: int | None) -> MemoryPlan:
    """The activation plan a run uses on GPUs of ``gpu_bytes`` (None: unknown, as on CPU), deciding the ``auto``
    settings from the estimate against ``memory_limit`` (``settled_plan`` gives the plans that need no
    estimate):

    * ``mlp_tiles: auto``: the tile counts tried are ``MLP_TILE_CHOICES`` (1 alone for a model with no dense
      MLP, MoE); a set count is the only one tried.
    * ``ac_mode`` set (not ``auto``): the fewest tiles whose estimate is under the line; when none is, the
      fewest with the lowest estimate (the peak may be a moment tiling does not touch, like the loss).
    * ``ac_mode: auto``: each layer runs at one of the ``LEVELS`` (no recompute, selective ``op``, selective
      ``attention``, full recompute; MoE models and tiled MLPs skip the selective levels whose memory is not
      modelled for them: ``_auto_levels``). For each tile count and each pair of levels, the most leading layers
      K at the level that keeps more, with the others at the one that keeps less, whose estimate is under the
      line (``_most_layers_at``). Of the plans that fit, the one that recomputes least (``_recompute_cost``;
      on a tie, the fewest tiles): a GPU with room recomputes nothing, a tighter one mixes the levels that fill
      it, one that must tile keeps as much as its tiles let it. Where nothing fits even with full AC: full AC
      with the tiles of the lowest estimate.
    """
    settled = settled_plan(cfg, gpu_bytes is not None)
    if settled is not None:
        return settled
    limit = memory_limit(cfg, gpu_bytes)
    mode, option = resolve_ac(cfg.model.enable_activation_checkpointing, cfg.model.ac_mode, cfg.model.ac_option)
    tiles = cfg.model.planned_mlp_tiles()
    choices = (1,) if model.args.is_moe else MLP_TILE_CHOICES if tiles == "auto" else (int(tiles),)
    if mode == "auto":
        return _auto_plan(model, cfg, world_size, choices, limit)
    return MemoryPlan(mode, option, _fewest_tiles(model, cfg, world_size, MemoryPlan(mode, option, 1), choices,
                                                  limit))


def _fewest_tiles(model: torch.nn.Module, cfg: TrainConfig, world_size: int, plan: MemoryPlan,
                  choices: tuple[int, ...], limit: float) -> int:
    """The fewest of ``choices`` whose estimate with ``plan``'s AC is under ``limit``, else the fewest with the
    lowest estimate (one choice: that one, unestimated)."""
    if len(choices) == 1:
        return choices[0]
    peaks = {t: _peak_bytes(model, cfg, world_size, replace(plan, mlp_tiles=t)) for t in choices}
    fitting = [t for t in choices if peaks[t] <= limit]
    return fitting[0] if fitting else min(peaks, key=lambda t: (peaks[t], t))


def _auto_plan(model: torch.nn.Module, cfg: TrainConfig, world_size: int, choices: tuple[int, ...],
               limit: float) -> MemoryPlan:
    """``ac_mode: auto`` with the tile counts ``choices``, by the rule in ``memory_plan``'s docstring."""
    n = model.args.n_layers
    plans = []
    for tiles in choices:
        for more, less in itertools.combinations(_auto_levels(model.args, tiles), 2):
            kept = _most_layers_at(model, cfg, world_size, tiles, limit, more, less)
            if kept is not None:
                plans.append(mixed_plan({more: kept, less: n - kept}, n, tiles))
    if plans:
        doc_tokens = row_tokens(cfg, is_preference(cfg))
        return min(plans, key=lambda p: (_recompute_cost(model.args, p, doc_tokens), p.mlp_tiles))
    full = MemoryPlan("full", None, 1)
    return replace(full, mlp_tiles=_fewest_tiles(model, cfg, world_size, full, choices, limit))


def _auto_levels(args: Any, tiles: int) -> tuple[str, ...]:
    """The levels ``auto`` mixes: all of ``LEVELS`` for dense layers with untiled MLPs; no selective ``op``
    with tiles (its memory with tiles is not modelled); no selective level for MoE layers (``op`` would recompute
    the experts' grouped GEMMs it does not list, and neither is modelled for experts)."""
    if args.is_moe:
        return ("none", "full")
    return ("none", "attention", "full") if tiles > 1 else LEVELS


def mixed_plan(counts: dict[str, int], n_layers: int, tiles: int) -> MemoryPlan:
    """The plan with ``counts`` layers at each named level (the rest recomputed in full), in the form the
    trainer applies: every layer at one level is that mode (``none``, ``full``), anything else ``auto`` with
    its ``(keep, op, attention)`` counts."""
    keep, op, attention = (counts.get(level, 0) for level in ("none", "op", "attention"))
    if keep == n_layers:
        return MemoryPlan("none", None, tiles)
    if keep + op + attention == 0:
        return MemoryPlan("full", None, tiles)
    return MemoryPlan("auto", (keep, op, attention), tiles)


def _most_layers_at(model: torch.nn.Module, cfg: TrainConfig, world_size: int, tiles: int, limit: float,
                    more: str, less: str) -> int | None:
    """The largest K whose plan, K leading layers at level ``more`` and the others at ``less``, is estimated
    under ``limit`` (None when even K = 0 is not); the estimate grows with K, so a binary search."""
    n = model.args.n_layers

    def fits(kept: int) -> bool:
        return _peak_bytes(model, cfg, world_size, mixed_plan({more: kept, less: n - kept}, n, tiles)) <= limit

    if not fits(0):
        return None
    low, high = 0, n
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


# The element-wise work a layer's forward recomputes (norms, RoPE, SiLU and products, residual adds, casts), as
# a share of its forward matmul FLOPs: it is memory-bound, so counted by the time it took against the matmuls on
# Qwen3-1.7B at 16K tokens on an H200 (docs/benchmarks.md, seventh session: selective ``op`` recomputes only
# it, 19 ms a step over no AC, against 66 ms of forward matmuls).
ELEMENTWISE_SHARE = 0.3


def level_costs(args: Any, doc_tokens: int) -> dict[str, float]:
    """Forward FLOPs per token one layer's backward recomputes at each of ``LEVELS``: ``full`` its whole
    forward, the matmuls (2·D·(hd·(2·H + 2·KV) + 3·F)), causal attention over a document of ``doc_tokens``
    (2·H·hd·L) and the element-wise work (``ELEMENTWISE_SHARE`` of the matmuls); ``attention`` all but the
    attention; ``op`` the element-wise work only; ``none`` nothing. ``doc_tokens`` is the row's length: for
    rows packed with shorter documents it overstates what ``full`` adds over ``attention``."""
    matmul = 2 * args.dim * (args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * args.hidden_dim)
    elementwise = ELEMENTWISE_SHARE * matmul
    return {"none": 0.0, "op": elementwise, "attention": matmul + elementwise,
            "full": matmul + 2 * args.n_heads * args.head_dim * doc_tokens + elementwise}


def _recompute_cost(args: Any, plan: MemoryPlan, doc_tokens: int) -> float:
    """What ``plan`` adds to a step's forward, in FLOPs per token: each layer's ``level_costs``, and with
    tiles each layer's MLP matmuls (6·D·F) once more."""
    costs = level_costs(args, doc_tokens)
    tiles = 6 * args.dim * args.hidden_dim * args.n_layers if plan.mlp_tiles > 1 else 0.0
    return sum(costs[level] * count for level, count in plan.layer_counts(args.n_layers).items()) + tiles


def estimate_memory(model: torch.nn.Module, cfg: TrainConfig, world_size: int,
                    gpu_bytes: int | None = None) -> MemoryEstimate:
    """The per-GPU estimate of ``cfg`` with ``model`` (built on the meta device) on ``world_size`` ranks of
    ``gpu_bytes`` each (for the ``auto`` settings, ``memory_plan``): the moment of the step with the most bytes
    live."""
    plan = memory_plan(model, cfg, world_size, gpu_bytes)
    shapes, step, row, objective = _step(model, cfg, world_size, plan)
    phase, peak = max(step_moments(shapes, step).items(), key=lambda item: item[1].total)
    state = step.state_bytes * shapes.params // world_size
    return MemoryEstimate(
        objective=objective, plan=plan, params=shapes.params, row_tokens=row,
        tokens_per_gpu=step.tokens, state_bytes_per_param=step.state_bytes, offload=step.offload,
        optimizer_offload=step.host_state_bytes > 0, phase=phase, **asdict(peak),
        host_state_per_rank=(state + step.reference if step.offload
                             else step.host_state_bytes * shapes.params // world_size),
        host_activations_per_rank=step.tokens * sum(step.kept) if step.activations_on_host else 0,
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
