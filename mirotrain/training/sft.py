"""Supervised fine-tuning: the shared :class:`~mirotrain.training.trainer.Trainer` with the cross-entropy
objective (chunked linear cross-entropy over the trained tokens of packed or padded rows)."""

from __future__ import annotations

import logging
from typing import Any

from mirotrain.config.tree import TrainConfig
from mirotrain.training.builder import as_config, build_loaders, build_policy, finish_run, start_run
from mirotrain.training.forward import HeadChunks
from mirotrain.training.objectives import CrossEntropyObjective
from mirotrain.training.trainer import Trainer

log = logging.getLogger("mirotrain.train")


class SFTTrainer(Trainer):
    """The trainer wired for SFT from ``cfg`` (a typed config, or a raw dict that is checked first).

    ``train_loader`` / ``val_loader``: optional loaders following the data contract (docs/contracts.md); by
    default they are built from ``dataset`` / ``dataset_val``.
    """

    def __init__(self, cfg: TrainConfig | dict, *, train_loader: Any = None, val_loader: Any = None):
        cfg = as_config(cfg)
        env = start_run(cfg, tokenizer=train_loader is None or val_loader is None)
        if cfg.dpo.ref_checkpointer:
            log.warning("Config key 'ref_checkpointer' is a DPO setting; `mirotrain sft` ignores it.")
        loss = CrossEntropyObjective.build_loss(cfg)
        model = build_policy(env, loss)
        train_loader, val_loader = build_loaders(cfg, env, train_loader, val_loader)
        parts = finish_run(cfg, env, "sft", model, train_loader, val_loader)
        objective = CrossEntropyObjective(loss, env.layout, parts.loop.grad_accum, env.model_spec.offload_activations,
                                          HeadChunks(cfg.model))
        super().__init__(parts, objective)


def run_sft(cfg: TrainConfig | dict, **loaders: Any) -> dict[str, Any]:
    """Train per ``cfg``; returns the run summary (see docs/contracts.md)."""
    return SFTTrainer(cfg, **loaders).train()
