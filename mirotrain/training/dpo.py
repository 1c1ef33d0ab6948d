"""DPO: the shared :class:`~mirotrain.training.trainer.Trainer` with the DPO objective and the reference stage.

Everything but the loss step is SFT's: meshes, FSDP2, optimizer, schedule, async DCP checkpoints and
auto-resume, metrics, HF export. What changes:

* **data** — packed DPO rows (:mod:`mirotrain.data.preference`): many pairs per row, a pair's chosen and
  rejected in the same row, so one varlen forward gives both sums and the micro-batch holds as many pairs
  as fit in ``packed_seq_len``;
* **reference** — :class:`~mirotrain.training.reference.ReferenceStage`: ``reference: precompute`` (default)
  fills a cache of reference log-probs beside the shards at setup (or alone with ``--precompute-only``) and
  training reads them as columns; ``reference: live`` evaluates a frozen sharded copy per micro-batch;
* **loss step** — :class:`~mirotrain.training.objectives.DPOObjective`: the mean per-pair loss, whatever the
  packing, accumulation or parallel layout, with its reward and log-prob metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from mirotrain.config.tree import TrainConfig, replace_section
from mirotrain.modules.loss.dpo import DPOLoss
from mirotrain.modules.loss.logprobs import DEFAULT_CHUNK_SIZE
from mirotrain.training.builder import RunEnv, as_config, build_loaders, build_policy, finish_run, start_run
from mirotrain.training.builders import build_loader
from mirotrain.training.forward import HeadChunks
from mirotrain.training.objectives import DPOObjective
from mirotrain.training.reference import ReferenceSettings, ReferenceStage
from mirotrain.training.trainer import Trainer

log = logging.getLogger("mirotrain.dpo")


@dataclass
class _Setup:
    """A DPO run up to its loaders: the policy and the reference stage that filled the loaders' columns."""

    env: RunEnv
    loss: DPOLoss
    model: nn.Module
    reference: ReferenceStage
    train_loader: Any
    val_loader: Any


def _setup(cfg: TrainConfig, train_loader: Any, val_loader: Any) -> _Setup:
    env = start_run(cfg, tokenizer=train_loader is None or val_loader is None)
    loss = DPOObjective.build_loss(cfg, env.layout)
    model = build_policy(env, loss)
    reference = ReferenceStage(ReferenceSettings.from_config(cfg), env.model_spec, env.layout, env.place, env.seed)

    def reread(section: str, shard_dir: str) -> Any:
        """``section``'s loader on the cache directory that carries the reference columns."""
        ds = cfg.data.section(section).with_shard_dir(shard_dir)
        return build_loader(replace_section(cfg, "data", **{section: ds}), section, env.layout, seed=env.seed,
                            tokenizer=env.tokenizer)

    def with_reference(loader: Any, section: str) -> Any:
        if getattr(loader, "mode", None) != "dpo":
            raise ValueError(f"`mirotrain dpo` needs preference data in {section} (preference_dataset or a DPO "
                             f"shard_dir), got {getattr(loader, 'mode', type(loader).__name__)!r} rows")
        return reference.attach(loader, section, model, reread)

    train_loader, val_loader = build_loaders(cfg, env, train_loader, val_loader, prepare=with_reference)
    return _Setup(env, loss, model, reference, train_loader, val_loader)


class DPOTrainer(Trainer):
    """The trainer wired for DPO from ``cfg`` (a typed config, or a raw dict that is checked first)."""

    def __init__(self, cfg: TrainConfig | dict, *, train_loader: Any = None, val_loader: Any = None):
        cfg = as_config(cfg)
        s = _setup(cfg, train_loader, val_loader)
        parts = finish_run(cfg, s.env, "dpo", s.model, s.train_loader, s.val_loader)
        objective = DPOObjective(s.loss, s.reference.logprobs(), s.env.layout, parts.loop.grad_accum,
                                 s.env.model_spec.offload_activations, HeadChunks(cfg.model, DEFAULT_CHUNK_SIZE))
        super().__init__(parts, objective)
        self.reference = s.reference

    @property
    def reference_pass_seconds(self) -> float:
        """Time this run spent computing reference log-probs (0 on a cache hit or with ``reference: live``)."""
        return self.reference.seconds


def precompute_reference(cfg: TrainConfig | dict, **loaders: Any) -> dict[str, Any]:
    """Only the reference pass: fill the cache of every configured data section and return where it is.
    Writes no training state or metrics into the output_dir (the pipeline runs it again before resuming)."""
    cfg = as_config(cfg)
    cfg = replace_section(cfg, "checkpoint", auto_resume=False)  # the pass never needs training state
    if cfg.dpo.reference == "live":
        log.warning("--precompute-only with reference: live has nothing to precompute")
    s = _setup(cfg, loaders.get("train_loader"), loaders.get("val_loader"))
    s.env.run_lock.release()
    return {"recipe": "dpo", "precompute_only": True, "reference_dirs": s.reference.dirs,
            "output_dir": str(s.env.output_dir)}


def run_dpo(cfg: TrainConfig | dict, *, precompute_only: bool = False, **loaders: Any) -> dict[str, Any]:
    """Train per ``cfg`` (or only precompute the reference log-probs); returns the run summary."""
    if precompute_only:
        return precompute_reference(cfg, **loaders)
    return DPOTrainer(cfg, **loaders).train()
