"""DPO's reference stage: the reference model's log-probs of every pair, precomputed once or live.

``reference: precompute`` (default): one forward-only pass over the packed shards (~1/3 of a training step per
row) writes ``ref_chosen_logp`` / ``ref_rejected_logp`` into a cached copy of the shards
(:mod:`mirotrain.training.reference_cache`), and training reads them as batch columns: it holds one model
instead of two and spends no compute on the reference. The pass runs at setup when the cache is missing (or
alone with ``mirotrain dpo --precompute-only``), before any optimizer step or restore, so with the default
reference (the starting weights) it simply reuses the freshly loaded policy.

``reference: live`` keeps a frozen copy of the reference, sharded like the policy, and computes the same
numbers per micro-batch (:class:`LiveReference`); the two give the same losses (tests/training/test_dpo_training.py).

The stage is built from its own config (``reference``, ``ref_checkpointer``; :class:`ReferenceSettings`) and
the run's model spec and layout; its reference model is a model of its own, never the trainer's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mirotrain.config import instantiate
from mirotrain.config.tree import TrainConfig
from mirotrain.data.batch import PreferenceBatch
from mirotrain.modules.loss.logprobs import DEFAULT_CHUNK_SIZE, pair_logprobs
from mirotrain.training.builders import ModelSpec, build_model, init_device_signature
from mirotrain.training.distributed import broadcast_object
from mirotrain.training.forward import BatchPlacement, HeadChunks, forward_hidden, reshard
from mirotrain.training.layout import Layout
from mirotrain.training.reference_cache import (REF_COLUMNS, has_reference_columns, num_pair_ids, reference_cache_key,
                                                reference_shard_dir, write_reference_dir)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ forward
def forward_pair_logprobs(model: nn.Module, batch: PreferenceBatch, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          sp_group: Any = None, sp_rank: int = 0) -> dict[str, torch.Tensor]:
    """Chosen/rejected log-prob sums (fp32) and token counts of every pair in a packed DPO batch.

    The model reads ``batch``'s (device) inputs; the token selection reads the host batch it was moved from
    (``batch.host``, see :meth:`mirotrain.data.batch.SFTBatch.to`: no host sync), or ``batch`` itself when
    it never left the host. Under Ulysses SP the batch is this rank's shard (``shard_batch_for_sp``): its
    columns start at ``sp_rank * T_local`` and the partial sums are reduced over ``sp_group``.
    """
    src = batch.host if batch.host is not None else batch
    hidden = forward_hidden(model, batch)
    offset = sp_rank * src.labels.shape[-1]
    out = pair_logprobs(hidden, model.lm_head_weight, src.labels, src.cu_seqlens, src.chosen_index,
                        src.rejected_index, token_offset=offset, chunk_size=chunk_size)
    if sp_group is not None and dist.is_initialized() and dist.get_world_size(sp_group) > 1:
        from mirotrain.parallel.ulysses import sp_all_reduce_sum

        # identity backward: each SP rank back-propagates the shared pair losses through its own tokens
        for key in ("chosen_logps", "rejected_logps"):
            out[key] = sp_all_reduce_sum(out[key], sp_group)
        for key in ("chosen_tokens", "rejected_tokens"):
            dist.all_reduce(out[key], op=dist.ReduceOp.SUM, group=sp_group)
    return out


class LiveReference:
    """``reference: live``: a frozen copy of the reference model evaluated on each micro-batch.

    Parameters are frozen and the model is in eval mode; the forward runs under ``no_grad``, so no
    activations are kept, and the gathered parameters are freed after it.
    """

    def __init__(self, model: nn.Module, chunks: HeadChunks, sp_group: Any = None, sp_rank: int = 0):
        self.model = freeze(model)
        self.chunks, self.sp_group, self.sp_rank = chunks, sp_group, sp_rank

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = forward_pair_logprobs(self.model, batch, chunk_size=self.chunks(batch), sp_group=self.sp_group,
                                    sp_rank=self.sp_rank)
        reshard(self.model)
        return out["chosen_logps"].detach(), out["rejected_logps"].detach()


class PrecomputedReference:
    """``reference: precompute``: the ``ref_chosen_logp`` / ``ref_rejected_logp`` columns of a batch, as fp32."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in REF_COLUMNS if c not in batch.pair_columns]
        if missing:
            raise KeyError(f"batch has no precomputed reference columns {missing}; run the reference pass "
                           "(`mirotrain dpo --precompute-only`) or set reference: live")
        chosen, rejected = (batch.pair_columns[c].to(self.device, torch.float32, non_blocking=True) for c in REF_COLUMNS)
        return chosen, rejected


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------- pass
@torch.no_grad()
def compute_reference_columns(model: nn.Module, batches: Iterable[PreferenceBatch], num_pairs: int,
                              device: torch.device, chunks: HeadChunks, *, sp_group: Any = None, sp_rank: int = 0,
                              sp_size: int = 1) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair, indexed by pair id, identical on every rank.

    ``batches`` yields this rank's prepared rows (every rank the same number of batches, as FSDP needs). Each
    pair is seen by exactly one data-parallel group; the values are summed over all ranks and divided by the
    SP degree (the ranks of an SP group hold the same full sums).
    """
    model.eval()
    chosen = torch.zeros(num_pairs, dtype=torch.float64, device=device)
    rejected = torch.zeros(num_pairs, dtype=torch.float64, device=device)
    for batch in batches:
        out = forward_pair_logprobs(model, batch, chunk_size=chunks(batch), sp_group=sp_group, sp_rank=sp_rank)
        ids = batch.pair_ids.to(device, torch.long)
        chosen.index_add_(0, ids, out["chosen_logps"].double())
        rejected.index_add_(0, ids, out["rejected_logps"].double())
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in (chosen, rejected):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if sp_size > 1:
                t.div_(sp_size)
    return {"ref_chosen_logp": chosen.cpu(), "ref_rejected_logp": rejected.cpu()}


# -------------------------------------------------------------------------------------------- stage
@dataclass(frozen=True)
class ReferenceSettings:
    """The reference's own config: ``reference`` (precompute | live) and its weights, ``ref_checkpointer``
    (default: the policy's ``checkpointer``, i.e. the starting weights)."""

    mode: str
    checkpointer: dict | None  # the checkpointer node that loads the reference weights
    checkpoint_dir: str | None
    same_as_policy: bool  # the reference is the policy's starting weights
    chunks: HeadChunks

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ReferenceSettings":
        own_dir = (cfg.dpo.ref_checkpointer or {}).get("checkpoint_dir")
        checkpoint_dir = str(own_dir) if own_dir else cfg.checkpoint.checkpoint_dir
        node = cfg.dpo.ref_checkpointer or cfg.checkpoint.checkpointer
        return cls(mode=cfg.dpo.reference, checkpointer={**node, "checkpoint_dir": checkpoint_dir} if node else None,
                   checkpoint_dir=checkpoint_dir, same_as_policy=checkpoint_dir == cfg.checkpoint.checkpoint_dir,
                   chunks=HeadChunks(cfg.model, DEFAULT_CHUNK_SIZE))


class ReferenceStage:
    """The reference log-probs of a DPO run (see the module docstring): :meth:`attach` gives a loader whose rows
    carry the precomputed columns, :meth:`logprobs` what the objective calls per micro-batch.

    ``seconds`` is the time spent in reference passes; ``dirs`` the cache directory of each data section."""

    def __init__(self, settings: ReferenceSettings, model_spec: ModelSpec, layout: Layout, place: BatchPlacement,
                 seed: int):
        self.settings, self.model_spec, self.layout, self.place, self.seed = settings, model_spec, layout, place, seed
        self.seconds = 0.0
        self.dirs: dict[str, str] = {}

    @property
    def live(self) -> bool:
        return self.settings.mode == "live"

    def build_model(self) -> nn.Module:
        """The reference model from its own checkpointer, sharded exactly like the policy, frozen."""
        node = self.settings.checkpointer
        return freeze(build_model(self.model_spec, self.layout, instantiate(node) if node else None, self.seed))

    def logprobs(self) -> Callable[[PreferenceBatch], tuple[torch.Tensor, torch.Tensor]]:
        if self.live:
            return LiveReference(self.build_model(), self.settings.chunks, self.layout.sp_group, self.layout.sp_rank)
        return PrecomputedReference(self.layout.device)

    def attach(self, loader: Any, section: str, policy: nn.Module, rebuild: Callable[[str, str], Any]) -> Any:
        """``loader`` if it already carries the reference columns (or the reference is live), else
        ``rebuild(section, cache_dir)`` once the pass has filled the cache. ``policy`` still holds its starting
        weights (setup runs before any step or restore) and is reused when the reference is those weights."""
        if self.live or has_reference_columns(loader.shard_dir):
            return loader
        self.dirs[section] = self._ensure_cache(loader, policy)
        return rebuild(section, self.dirs[section])

    def _cache_key(self, manifest: dict) -> str:
        spec, model_dir = self.model_spec, self.settings.checkpoint_dir
        # random init: the weights depend on the seed and on the generator's device (CUDA draws differ from
        # CPU draws, and between GPU models with different SM counts)
        init_device = spec.init_device(self.layout.device)
        extra = {"seed": self.seed, "init_device": init_device_signature(init_device)} if model_dir is None else {}
        extra["model"] = dict(spec.component)
        # Like dtype and the attention backend, the MLP's tiles change the numbers in their last bits (each tile's
        # partial sum is rounded before the fp32 sum: mirotrain/modules/tiled_mlp.py), so a tiled run does not
        # reuse an untiled cache nor the reverse; an untiled run keeps the key it had before (its caches stay valid).
        if spec.mlp_tiles > 1:
            extra["mlp_tiles"] = spec.mlp_tiles
        # Not keyed: compiled or eager layers and the deterministic mode's kernels, which change only the order of
        # additions inside a kernel (as much as two GPU runs of one config differ): such caches stay shared.
        # float8 matmuls change the log-probs far more than tiles do; keyed only when on, as the tiles are
        if spec.fp8_recipe is not None:
            extra["fp8_recipe"] = spec.fp8_recipe
        return reference_cache_key(model_dir, manifest, dtype=spec.dtype_name, attention_backend=spec.attention_backend,
                                   extra=extra)

    def _ensure_cache(self, loader: Any, policy: nn.Module) -> str:
        """``{shard_dir}.ref-{key}``: reused when complete, else computed now (all ranks) and written by rank 0."""
        from mirotrain.data.shards import manifest_exists

        key = self._cache_key(loader.manifest)
        out_dir = reference_shard_dir(loader.shard_dir, key)
        # one decision for all ranks: the pass below is collective
        if broadcast_object(manifest_exists(out_dir) if self.layout.is_main else None):
            log.info("Reference log-probs: cache hit %s", out_dir)
            return out_dir
        reuse_policy = self.settings.same_as_policy
        model = policy if reuse_policy else self.build_model()
        log.info("Reference log-probs: computing %s over %d rows with %s", out_dir, len(loader.reader),
                 "the starting policy weights" if reuse_policy else "a separate reference model")
        was_training = model.training
        start = time.perf_counter()
        layout = self.layout
        columns = compute_reference_columns(model, self._batches(loader), num_pair_ids(loader.reader), layout.device,
                                            self.settings.chunks, sp_group=layout.sp_group, sp_rank=layout.sp_rank,
                                            sp_size=layout.sp_size)
        reshard(model)
        model.train(was_training)
        del model
        if layout.is_main:
            write_reference_dir(loader.shard_dir, out_dir, columns, {"key": key})
        dist.barrier()
        self.seconds += time.perf_counter() - start
        log.info("Reference log-probs: pass over %d rows took %.1f s", len(loader.reader), self.seconds)
        return out_dir

    def _batches(self, loader: Any) -> Iterator[PreferenceBatch]:
        """This rank's rows of the whole shard directory in order (padding rows where ranks run out)."""
        from mirotrain.data.collate import padded_collate_dpo, padding_dpo_row
        from mirotrain.data.samplers import DistributedRowSampler

        sampler = DistributedRowSampler(len(loader.reader), dp_rank=self.layout.dp_rank, dp_size=self.layout.dp_size,
                                        shuffle=False)
        for item in sampler:
            row = padding_dpo_row(loader.pad_id) if item is None else dict(loader.reader.row(item))
            yield self.place(padded_collate_dpo([row], pad_id=loader.pad_id, packed_seq_len=loader.packed_seq_len,
                                                extra_columns=[]))
