"""What the loop optimises: one strategy object per recipe, called by :class:`~mirotrain.training.trainer.Trainer`.

An objective knows how to count the targets of a micro-batch (the loss of an optimizer step is the mean over
them), how to run forward and backward of one micro-batch with the step's gradient scale, the validation sums of
one batch, its own metrics over a logging window, and its state for step checkpoints. The loop owns the rest.

* :class:`CrossEntropyObjective` (SFT): chunked linear cross-entropy, normalised over trained tokens.
* :class:`DPOObjective`: fused fp32 log-prob sums (:mod:`mirotrain.modules.loss.logprobs`), then
  :class:`~mirotrain.modules.loss.dpo.DPOLoss` summed over pairs and normalised over the pairs of the optimizer
  step on all data-parallel ranks: the gradient is that of the mean per-pair loss, whatever the packing,
  accumulation or parallel layout. Under Ulysses SP the ranks of one group hold disjoint tokens of the same
  pairs: each computes partial sums, they are all-reduced (gradient only through the local part) and every SP
  rank evaluates the same pair losses, so pair counts and loss sums are divided by the SP degree before the
  global reductions. Its metrics (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
  logps/chosen, logps/rejected, loss/<type>) are averaged over every pair of the logging window on every rank.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
import torch.distributed as dist
from torch import nn

from mirotrain.config import instantiate
from mirotrain.config.tree import TrainConfig
from mirotrain.data.batch import PreferenceBatch, SFTBatch
from mirotrain.modules.loss.dpo import DPOLoss
from mirotrain.training.forward import HeadChunks, forward_hidden
from mirotrain.training.layout import Layout
from mirotrain.training.reference import forward_pair_logprobs

# (ref_chosen_logp, ref_rejected_logp) of a batch's pairs: precomputed columns or a live frozen model
ReferenceLogprobs = Callable[[PreferenceBatch], tuple[torch.Tensor, torch.Tensor]]
DPO_METRICS = ("pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


class Objective(Protocol):
    """The recipe's loss step, as the loop calls it."""

    loss: nn.Module
    # what count_targets counts; the loop reports its rate as ``{target_unit}_per_sec_per_gpu``
    target_unit: str

    def count_targets(self, batch: SFTBatch) -> float:
        """This rank's share of the targets of a prepared micro-batch (host arithmetic on the CPU labels)."""

    def forward_backward(self, model: nn.Module, batch: SFTBatch, grad_scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of ``Σ losses · grad_scale``; returns this rank's Σ losses (detached)."""

    def evaluating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The mode validation runs in."""

    def validation_sums(self, model: nn.Module, batch: SFTBatch) -> torch.Tensor:
        """``[Σ losses, number of targets]`` of a validation batch (float64, device)."""

    def window_metrics(self) -> dict[str, float]:
        """Metrics over the logging window (collective: every rank calls it at logging steps)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state beyond model/optimizer/data, stored in the step checkpoint's train state."""

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned, from the resumed train state's ``extra``."""


def offloading(enabled: bool) -> contextlib.AbstractContextManager:
    """Saved activations to pinned host memory (``enable_activation_offloading``, CUDA only)."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if enabled else contextlib.nullcontext()


def backward_with_router_loss(loss: torch.Tensor, model: nn.Module, layout: Layout, grad_accum: int) -> None:
    """``loss.backward()``, plus a MoE model's router loss share as the MoE module documents (its shares over
    ranks sum to the global loss; per micro-batch mean over gradient accumulation)."""
    aux_loss = getattr(model, "moe_aux_loss", None)
    aux = aux_loss(layout.loss_group) if aux_loss is not None else None
    if aux is not None:
        loss = loss + aux * (layout.grad_divide_factor / grad_accum)
    loss.backward()


class CrossEntropyObjective:
    """SFT: Σ token cross-entropies over the trained tokens (chunked linear CE by default)."""

    target_unit = "trained_tokens"

    def __init__(self, loss: nn.Module, layout: Layout, grad_accum: int, offload_activations: bool,
                 chunks: HeadChunks):
        self.loss, self.layout, self.grad_accum = loss, layout, grad_accum
        self.offload_activations, self.chunks = offload_activations, chunks

    @staticmethod
    def build_loss(cfg: TrainConfig) -> nn.Module:
        """The ``loss`` section (default: chunked LinearCrossEntropyLoss)."""
        if cfg.model.loss is None:
            from mirotrain.modules.loss import LinearCrossEntropyLoss

            return LinearCrossEntropyLoss()
        return instantiate(cfg.model.loss)

    def count_targets(self, batch: SFTBatch) -> int:
        return batch.num_targets()

    def _loss_sum(self, model: nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with offloading(self.offload_activations):
            hidden = forward_hidden(model, batch)
        chunk = self.chunks(batch)
        if chunk is not None and hasattr(self.loss, "chunk_tokens"):
            self.loss.chunk_tokens = chunk  # the chunked CE takes its chunk length as a setting, not an argument
        return self.loss(hidden, model.lm_head_weight, batch.labels)

    def forward_backward(self, model: nn.Module, batch: SFTBatch, grad_scale: torch.Tensor) -> torch.Tensor:
        loss_sum, _ = self._loss_sum(model, batch)
        backward_with_router_loss(loss_sum * grad_scale, model, self.layout, self.grad_accum)
        return loss_sum.detach()

    def evaluating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def validation_sums(self, model: nn.Module, batch: SFTBatch) -> torch.Tensor:
        loss_sum, count = self._loss_sum(model, batch)
        return torch.stack([loss_sum.double(), count.double()])

    def window_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        pass


class DPOObjective:
    """DPO (see the module docstring): pair losses against the reference log-probs ``reference`` gives."""

    target_unit = "pairs"

    def __init__(self, loss: DPOLoss, reference: ReferenceLogprobs, layout: Layout, grad_accum: int,
                 offload_activations: bool, chunks: HeadChunks):
        self.loss, self.reference, self.layout, self.grad_accum = loss, reference, layout, grad_accum
        self.offload_activations, self.chunks = offload_activations, chunks
        self._sums: dict[str, torch.Tensor] = {}

    @staticmethod
    def build_loss(cfg: TrainConfig, layout: Layout) -> DPOLoss:
        """``loss`` section (DPOLoss; default sigmoid, beta 0.1), summing over pairs: the loop normalises."""
        node = cfg.model.loss or {"_component_": "mirotrain.modules.loss.DPOLoss"}
        loss = instantiate(node, reduction="sum", process_group=layout.loss_group)
        if not isinstance(loss, DPOLoss):
            raise ValueError(f"loss._component_ must be a DPO loss (mirotrain.modules.loss.DPOLoss) for "
                             f"`mirotrain dpo`, got {node.get('_component_')!r}")
        return loss.to(layout.device)

    def count_targets(self, batch: PreferenceBatch) -> float:
        """Pairs of a micro-batch; the SP ranks of a group share them, so each counts 1/sp."""
        return batch.num_pairs / self.layout.sp_size

    def _pair_losses(self, model: nn.Module, batch: PreferenceBatch, offload: bool) -> Any:
        ref_c, ref_r = self.reference(batch)  # live: before the policy, so its activations are gone
        with offloading(offload):
            lp = forward_pair_logprobs(model, batch, chunk_size=self.chunks(batch), sp_group=self.layout.sp_group,
                                       sp_rank=self.layout.sp_rank)
        return self.loss(lp["chosen_logps"], lp["rejected_logps"], ref_c, ref_r,
                         chosen_token_counts=lp["chosen_tokens"])

    def forward_backward(self, model: nn.Module, batch: PreferenceBatch, grad_scale: torch.Tensor) -> torch.Tensor:
        """Backward of ``Σ pair losses · F / N``; returns Σ losses / sp."""
        out = self._pair_losses(model, batch, self.offload_activations)
        backward_with_router_loss(out.loss * grad_scale, model, self.layout, self.grad_accum)
        for name, value in out.metric_sums().items():
            value = value.detach().to(self.layout.device, torch.float64)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        return out.loss.detach() / self.layout.sp_size

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module) -> Iterator[None]:
        """Policy and loss in eval mode: the loss's running statistics (bco_pair) are read, not updated."""
        self.loss.eval()
        model.eval()
        try:
            yield
        finally:
            self.loss.train()
            model.train()

    def validation_sums(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        out = self._pair_losses(model, batch, offload=False)
        return torch.stack([out.loss.double(), torch.tensor(float(out.num_pairs), dtype=torch.float64,
                                                            device=self.layout.device)])

    def window_metrics(self) -> dict[str, float]:
        """Averages over every pair of the window and every rank (one all-reduce)."""
        sums, self._sums = self._sums, {}
        names = list(DPO_METRICS) + sorted(k for k in sums if k.startswith("loss/"))
        zero = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        vec = torch.stack([sums.get(k, zero) for k in names])
        dist.all_reduce(vec, group=self.layout.loss_group)
        values = (vec / self.layout.sp_size).tolist()  # host sync
        pairs = max(values[0], 1.0)
        metrics = {"pairs": values[0]}
        for name, value in zip(names[2:], values[2:]):
            metrics[name] = value / pairs
        if "bco_pair" in self.loss.loss_config:
            metrics["bco/delta"] = float(self.loss.bco_reward_sum / self.loss.bco_reward_count.clamp_min(1))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The DPO loss's running statistics (bco_pair delta)."""
        return {"dpo_loss": {k: float(v) for k, v in self.loss.state_dict().items()}}

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        saved = extra.get("dpo_loss")
        if saved:
            self.loss.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in saved.items()})
