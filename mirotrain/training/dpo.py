"""DPO: the shared :class:`~mirotrain.training.trainer.Trainer` with a preference loss step.

Everything but the loss step is SFT's: meshes, FSDP2, optimizer, schedule, async DCP checkpoints and
auto-resume, metrics, HF export. What changes:

* **data** — packed DPO rows (:mod:`mirotrain.data.preference`): many pairs per row, a pair's chosen and
  rejected in the same row, so one varlen forward gives both sums and the micro-batch holds as many pairs
  as fit in ``packed_seq_len``;
* **reference** — ``reference: precompute`` (default) reads ``ref_chosen_logp``/``ref_rejected_logp`` from
  the shards; the pass that writes them runs at setup when the cache is missing (or alone with
  ``--precompute-only``), before any optimizer step, so with the default reference (= the starting weights)
  it simply reuses the freshly loaded policy. ``reference: live`` evaluates a frozen sharded copy per
  micro-batch (:class:`~mirotrain.training.reference.LiveReference`);
* **loss step** — fused fp32 log-prob sums (:mod:`mirotrain.modules.loss.logprobs`), then
  :class:`~mirotrain.modules.loss.dpo.DPOLoss` summed over pairs and scaled by ``F / N`` where ``N`` is the
  number of pairs of the optimizer step over all data-parallel ranks: the gradient is that of the mean
  per-pair loss, whatever the packing, accumulation or parallel layout;
* **metrics** — rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
  logps/rejected and loss/<type>, averaged over every pair of the logging window on every rank.

Under Ulysses SP the ranks of one group hold disjoint tokens of the same pairs: each computes partial
sums, they are all-reduced (gradient only through the local part) and every SP rank evaluates the same
pair losses — so pair counts and loss sums are divided by the SP degree before the global reductions.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mirotrain.config import instantiate
from mirotrain.data.batch import PreferenceBatch
from mirotrain.modules.loss.dpo import DPOLoss
from mirotrain.modules.loss.logprobs import DEFAULT_CHUNK_SIZE
from mirotrain.parallel.fsdp import fsdp_modules
from mirotrain.training import reference as ref
from mirotrain.training.builders import cfg_value, init_device_signature
from mirotrain.training.distributed import broadcast_object
from mirotrain.training.trainer import Trainer

log = logging.getLogger("mirotrain.dpo")

METRIC_KEYS = ("pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def reference_checkpoint_dir(cfg: Mapping[str, Any]) -> str | None:
    """Weights of the reference: ``ref_checkpointer.checkpoint_dir``, else the policy's starting weights."""
    node = cfg.get("ref_checkpointer") or {}
    if node.get("checkpoint_dir"):
        return str(node["checkpoint_dir"])
    return (cfg.get("checkpointer") or {}).get("checkpoint_dir")


def same_weights_as_policy(cfg: Mapping[str, Any]) -> bool:
    return reference_checkpoint_dir(cfg) == (cfg.get("checkpointer") or {}).get("checkpoint_dir")


class DPOTrainer(Trainer):
    """DPO recipe (see the module docstring). ``precompute_only`` stops after the reference pass."""

    recipe = "dpo"

    def __init__(self, cfg: dict, *, precompute_only: bool = False, **kwargs: Any):
        self.reference_mode = str(cfg.get("reference") or "precompute")
        if self.reference_mode not in ("precompute", "live"):
            raise ValueError(f"reference must be 'precompute' or 'live', got {self.reference_mode!r}")
        self.precompute_only = precompute_only
        self.chunk_size = int(cfg.get("unembed_chunk_size") or DEFAULT_CHUNK_SIZE)
        self.live_reference: ref.LiveReference | None = None
        self.reference_dirs: dict[str, str] = {}
        self.reference_pass_seconds = 0.0
        if precompute_only:
            cfg = {**cfg, "auto_resume": False}  # the pass never needs training state
            if self.reference_mode == "live":
                log.warning("--precompute-only with reference: live has nothing to precompute")
        super().__init__(cfg, **kwargs)
        self._dpo_sums: dict[str, torch.Tensor] = {}
        if self.reference_mode == "live" and not precompute_only:
            self.live_reference = ref.LiveReference(self._build_reference_model(), self.chunk_size)

    # ------------------------------------------------------------------------------------ setup

    def build_loss(self) -> nn.Module:
        """``loss`` section (DPOLoss; default sigmoid, beta 0.1), summing over pairs: the trainer normalises."""
        node = self.cfg.get("loss") or {"_component_": "mirotrain.modules.loss.DPOLoss"}
        loss = instantiate(node, reduction="sum", process_group=self.loss_group)
        if not isinstance(loss, DPOLoss):
            raise ValueError(f"loss._component_ must be a DPO loss (mirotrain.modules.loss.DPOLoss) for "
                             f"`mirotrain dpo`, got {node.get('_component_')!r}")
        return loss.to(self.device)

    def _build_reference_model(self) -> nn.Module:
        """A second model from ``ref_checkpointer`` (or the base weights), sharded exactly like the policy."""
        saved_ckpt, saved_model = self.hf_checkpointer, getattr(self, "model", None)
        node = self.cfg.get("ref_checkpointer") or self.cfg.get("checkpointer")
        if node:
            node = {**node, "checkpoint_dir": reference_checkpoint_dir(self.cfg)}
        try:
            self.hf_checkpointer = instantiate(node) if node else None
            model = self._build_model()
        finally:
            self.hf_checkpointer = saved_ckpt
        self.model = saved_model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def build_train_loader(self, section: str) -> Any:
        """The DPO loader; with ``reference: precompute`` the rows carry the (cached) reference log-probs."""
        loader = super().build_train_loader(section)
        if getattr(loader, "mode", None) != "dpo":
            raise ValueError(f"`mirotrain dpo` needs preference data in {section} (preference_dataset or a DPO "
                             f"shard_dir), got {getattr(loader, 'mode', type(loader).__name__)!r} rows")
        if self.reference_mode != "precompute" or ref.has_reference_columns(loader.shard_dir):
            return loader
        ref_dir = self._ensure_reference_dir(loader)
        self.reference_dirs[section] = ref_dir
        cfg = copy.deepcopy(self.cfg)
        cfg[section] = {**cfg[section], "shard_dir": ref_dir}
        saved, self.cfg = self.cfg, cfg
        try:
            return super().build_train_loader(section)
        finally:
            self.cfg = saved

    def _reference_key(self, manifest: Mapping[str, Any]) -> str:
        model_dir = reference_checkpoint_dir(self.cfg)
        # random init: the weights depend on the seed and on the generator's device (CUDA draws differ from
        # CPU draws, and between GPU models with different SM counts)
        init_device = torch.device("cpu") if self.cpu_offload else self.device  # where the parameters live
        extra = {"seed": self.seed, "init_device": init_device_signature(init_device)} if model_dir is None else {}
        extra["model"] = {k: v for k, v in (self.cfg.get("model") or {}).items()}
        return ref.reference_cache_key(model_dir, manifest, dtype=str(cfg_value(self.cfg, "dtype")),
                                       attention_backend=str(cfg_value(self.cfg, "attention_backend")), extra=extra)

    def _ensure_reference_dir(self, loader: Any) -> str:
        """``{shard_dir}.ref-{key}``: reused when complete, else computed now (all ranks) and written by rank 0."""
        from mirotrain.data.shards import manifest_exists

        key = self._reference_key(loader.manifest)
        out_dir = ref.reference_shard_dir(loader.shard_dir, key)
        # one decision for all ranks: the pass below is collective
        if broadcast_object(manifest_exists(out_dir) if self.rank == 0 else None):
            log.info("Reference log-probs: cache hit %s", out_dir)
            return out_dir
        reuse_policy = same_weights_as_policy(self.cfg) and self.state_is_fresh()
        model = self.model if reuse_policy else self._build_reference_model()
        log.info("Reference log-probs: computing %s over %d rows with %s", out_dir, len(loader.reader),
                 "the starting policy weights" if reuse_policy else "a separate reference model")
        was_training = model.training
        start = time.perf_counter()
        columns = ref.compute_reference_columns(
            model, self._reference_batches(loader), ref.num_pair_ids(loader.reader), self.device,
            chunk_size=self.chunk_size, sp_group=self.meshes.sp_group if self.sp_size > 1 else None,
            sp_rank=self.sp_rank, sp_size=self.sp_size)
        for module in fsdp_modules(model):
            module.reshard()  # forward without backward leaves the root gathered
        model.train(was_training)
        if not reuse_policy:
            del model
        if self.rank == 0:
            ref.write_reference_dir(loader.shard_dir, out_dir, columns, {"key": key})
        dist.barrier()
        self.reference_pass_seconds += time.perf_counter() - start
        log.info("Reference log-probs: pass over %d rows took %.1f s", len(loader.reader), self.reference_pass_seconds)
        return out_dir

    def state_is_fresh(self) -> bool:
        """True while the policy still holds its loaded starting weights (setup runs before any restore)."""
        return getattr(self, "state", None) is None or self.state.step == 0

    def _reference_batches(self, loader: Any):
        """This rank's rows of the whole shard directory in order (padding rows where ranks run out)."""
        from mirotrain.data.collate import padded_collate_dpo, padding_dpo_row
        from mirotrain.data.samplers import DistributedRowSampler

        sampler = DistributedRowSampler(len(loader.reader), dp_rank=self.dp_rank, dp_size=self.dp_size,
                                        shuffle=False)
        for item in sampler:
            row = padding_dpo_row(loader.pad_id) if item is None else dict(loader.reader.row(item))
            batch = padded_collate_dpo([row], pad_id=loader.pad_id, packed_seq_len=loader.packed_seq_len,
                                       extra_columns=[])
            yield self.prepare_batch(batch)

    # -------------------------------------------------------------------------------- loss step

    def count_targets(self, batch: PreferenceBatch) -> float:
        """Pairs of a micro-batch; the SP ranks of a group share them, so each counts 1/sp."""
        return batch.num_pairs / self.sp_size

    def pair_logprobs(self, model: nn.Module, batch: PreferenceBatch) -> dict[str, torch.Tensor]:
        return ref.forward_pair_logprobs(model, batch, chunk_size=self.chunk_size,
                                         sp_group=self.meshes.sp_group if self.sp_size > 1 else None,
                                         sp_rank=self.sp_rank)

    def reference_logprobs(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.live_reference is not None:
            out = self.live_reference(batch, sp_group=self.meshes.sp_group if self.sp_size > 1 else None,
                                      sp_rank=self.sp_rank)
            for module in fsdp_modules(self.live_reference.model):
                module.reshard()
            return out
        return ref.batch_reference_logprobs(batch, self.device)

    def forward_backward(self, batch: PreferenceBatch, grad_scale: torch.Tensor) -> torch.Tensor:
        """Pair losses of one micro-batch, backward of ``Σ pair losses · F / N``; returns Σ losses / sp."""
        ref_c, ref_r = self.reference_logprobs(batch)  # live: before the policy, so its activations are gone
        with self._activation_offload():
            lp = self.pair_logprobs(self.model, batch)
        out = self.loss_fn(lp["chosen_logps"], lp["rejected_logps"], ref_c, ref_r,
                           chosen_token_counts=lp["chosen_tokens"])
        loss = out.loss * grad_scale
        aux = self.moe_aux_loss()
        if aux is not None:
            loss = loss + aux * (self.grad_divide_factor / self.ga)
        loss.backward()
        self._accumulate_metrics(out.metric_sums())
        return out.loss.detach() / self.sp_size

    def _accumulate_metrics(self, sums: Mapping[str, torch.Tensor]) -> None:
        for name, value in sums.items():
            value = value.detach().to(self.device, torch.float64)
            self._dpo_sums[name] = self._dpo_sums[name] + value if name in self._dpo_sums else value

    def extra_metrics(self) -> dict[str, float]:
        """DPO metrics averaged over every pair of the window and every rank (one all-reduce)."""
        metrics = super().extra_metrics()
        sums, self._dpo_sums = self._dpo_sums, {}
        names = list(METRIC_KEYS) + sorted(k for k in sums if k.startswith("loss/"))
        vec = torch.stack([sums.get(k, torch.zeros((), dtype=torch.float64, device=self.device)) for k in names])
        dist.all_reduce(vec, group=self.loss_group)
        values = (vec / self.sp_size).tolist()
        pairs = max(values[0], 1.0)
        metrics["pairs"] = values[0]
        for name, value in zip(names[2:], values[2:]):
            metrics[name] = value / pairs
        if "bco_pair" in self.loss_fn.loss_config:
            metrics["bco/delta"] = float(self.loss_fn.bco_reward_sum / self.loss_fn.bco_reward_count.clamp_min(1))
        return metrics

    # -------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> float:
        """Mean pair loss over the validation set (the loss in eval mode: running statistics untouched)."""
        loader = self.val_loader
        loader.set_epoch(0)
        self.loss_fn.eval()
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        it = iter(loader)
        try:
            for _ in range(int(loader.steps_per_epoch)):
                batch = self.prepare_batch(next(it))
                ref_c, ref_r = self.reference_logprobs(batch)
                lp = self.pair_logprobs(self.model, batch)
                out = self.loss_fn(lp["chosen_logps"], lp["rejected_logps"], ref_c, ref_r,
                                   chosen_token_counts=lp["chosen_tokens"])
                totals += torch.stack([out.loss.double(), torch.tensor(float(out.num_pairs), dtype=torch.float64,
                                                                       device=self.device)])
        finally:
            self.loss_fn.train()
            self.model.train()
        dist.all_reduce(totals, group=self.loss_group)
        for module in fsdp_modules(self.model):
            module.reshard()
        loss_total, n = totals.tolist()
        return loss_total / max(n, 1.0)

    # -------------------------------------------------------------------------------- checkpoints

    def recipe_state(self) -> dict[str, Any]:
        """The DPO loss's running statistics (bco_pair delta) travel in the step checkpoint."""
        return {"dpo_loss": {k: float(v) for k, v in self.loss_fn.state_dict().items()}}

    def load_recipe_state(self, extra: Mapping[str, Any]) -> None:
        saved = extra.get("dpo_loss")
        if saved:
            self.loss_fn.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in saved.items()})

    def metrics_dir(self) -> Path:
        """A reference-only run logs no training metrics: it keeps the run's metrics.jsonl and TensorBoard
        untouched (the pipeline runs the pass again before resuming a crashed run in the same output_dir)."""
        return self.output_dir / "reference_pass" if self.precompute_only else self.output_dir

    def train(self) -> dict[str, Any]:
        if self.precompute_only:
            summary = {"recipe": self.recipe, "precompute_only": True, "reference_dirs": self.reference_dirs,
                       "output_dir": str(self.output_dir)}
            self.close()
            return summary
        return super().train()


def run_dpo(cfg: dict, *, precompute_only: bool = False, **loaders: Any) -> dict[str, Any]:
    """Train per ``cfg`` (or only precompute the reference log-probs); returns the run summary."""
    return DPOTrainer(cfg, precompute_only=precompute_only, **loaders).train()
