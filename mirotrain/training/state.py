"""Everything a step checkpoint holds, gathered into one DCP state dict and restored from it.

Layout (keys of the DCP state dict):
  ``model``                     sharded model state (DTensors; DCP reshards on load)
  ``optim``                     sharded optimizer state tensors
  ``extra/optim_param_groups``  hyper-parameters of the optimizer groups (lr, betas, ...), JSON
  ``extra/lr_scheduler``        LR scheduler state, JSON
  ``extra/train_state``         step, epoch, step_in_epoch, seed, token counters, first and last logged metrics, JSON
  ``extra/rank{r}/dataloader``  the dataloader position of rank r, JSON
  ``extra/rank{r}/rng``         python / numpy / torch CPU / CUDA RNG states of rank r, JSON
Non-tensor state is stored as JSON in uint8 tensors (mirotrain.checkpoint.codec), so nothing is pickled.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from mirotrain.checkpoint.codec import decode, encode
from mirotrain.training.rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters of the loop. ``step`` counts optimizer steps over the whole run. ``first_loss`` (the first logged
    loss) and ``last_metrics`` (the last logged step's metrics) ride along so that a resumed run's summary
    describes the whole run, also when it trains no step at all."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    seed: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    first_loss: float | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1
        self.step_in_epoch += 1

    def record(self, metrics: dict[str, float], trained_tokens: int, total_tokens: int) -> None:
        """A logged window: its metrics and the tokens (all ranks) it trained on and computed."""
        self.trained_tokens += trained_tokens
        self.total_tokens += total_tokens
        self.last_metrics = metrics
        if self.first_loss is None:
            self.first_loss = metrics["loss"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _rank_key(rank: int, name: str) -> str:
    return f"extra/rank{rank}/{name}"


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, loader: Any,
                     train_state: TrainState, rank: int, device: torch.device) -> dict[str, Any]:
    """The DCP state dict of this rank (model/optimizer entries are views: stage before mutating them)."""
    optim = get_optimizer_state_dict(model, optimizer)
    state: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": optim["state"],
        "extra/optim_param_groups": encode(optim["param_groups"]),
        "extra/lr_scheduler": encode(lr_scheduler.state_dict() if lr_scheduler is not None else {}),
        "extra/train_state": encode(train_state.to_dict()),
        _rank_key(rank, "rng"): encode(capture_rng_state(device)),
    }
    if loader is not None and hasattr(loader, "state_dict"):
        state[_rank_key(rank, "dataloader")] = encode(loader.state_dict())
    return state


def restore_state(checkpointer: Any, path: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                  lr_scheduler: Any, loader: Any, rank: int, device: torch.device,
                  same_world: bool) -> TrainState:
    """Load a step checkpoint into the live objects and return its TrainState.

    With a different world size, model/optimizer are resharded by DCP; per-rank RNG and dataloader entries
    of the old layout do not map onto the new ranks and are not restored (see docs/training.md).
    """
    sizes = checkpointer.tensor_sizes(path, "extra/")
    template_optim = get_optimizer_state_dict(model, optimizer)
    wanted = ["extra/optim_param_groups", "extra/lr_scheduler", "extra/train_state"]
    if same_world:
        wanted += [k for k in (_rank_key(rank, "rng"), _rank_key(rank, "dataloader")) if k in sizes]
    state: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": template_optim["state"],
        **{k: torch.empty(sizes[k], dtype=torch.uint8) for k in wanted},
    }
    checkpointer.load(path, state)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    set_optimizer_state_dict(model, optimizer, {"state": state["optim"],
                                                "param_groups": decode(state["extra/optim_param_groups"])})
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(decode(state["extra/lr_scheduler"]))
    train_state = TrainState.from_dict(decode(state["extra/train_state"]))
    if same_world:
        rng_key, loader_key = _rank_key(rank, "rng"), _rank_key(rank, "dataloader")
        if rng_key in state:
            restore_rng_state(decode(state[rng_key]), device)
        if loader is not None and loader_key in state:
            loader.load_state_dict(decode(state[loader_key]))
    return train_state
