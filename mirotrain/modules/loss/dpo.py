"""Preference losses on per-sequence log-prob sums: DPO (sigmoid), IPO, hinge, BCO-pair and an SFT term.

Inputs are, per pair ``i``, the summed log-probs of the chosen and rejected responses under the policy
(``pi_c``, ``pi_r``) and the reference (``ref_c``, ``ref_r``). With ``z = (pi_c - pi_r) - (ref_c - ref_r)``
and implicit rewards ``r_c = beta (pi_c - ref_c)``, ``r_r = beta (pi_r - ref_r)``, each type's per-pair loss is
(written from the papers):

* ``sigmoid`` — DPO, Rafailov et al. 2023, with conservative label smoothing ``eps``:
  ``-(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)``.
* ``ipo`` — IPO, Azar et al. 2023: ``(z - 1 / (2 beta))^2`` (beta plays the paper's tau; sequence sums).
* ``hinge`` — SLiC / RSO hinge on the normalised likelihood ratio: ``max(0, 1 - beta z)``.
* ``bco_pair`` — BCO, Jung et al. 2024, on pairs: ``-log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))``
  where ``delta`` is the running mean of every reward seen so far (chosen and rejected, all data-parallel
  ranks, this batch included; in eval mode the mean is used but not updated).
* ``sft`` — negative log-likelihood of the chosen response per token: ``-pi_c / n_c``.

The total per pair is ``sum_k w_k loss_k`` over ``loss_config = {type: weight}``. Every term is a per-pair
quantity, so the trainer's reduction is the mean over all pairs of all ranks and accumulation steps — the
same result as one pair per micro-batch, for any number of pairs per packed row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "bco_pair", "sft")


def parse_loss_config(loss_config: Any) -> dict[str, float]:
    """Normalise ``loss_config`` to ``{type: weight}``; unknown types raise ``ValueError`` naming them.

    Accepts the MiroTrain form (a mapping) and, for convenience, a single type name or a list of names
    (weight 1 each).
    """
    if loss_config is None:
        loss_config = {"sigmoid": 1.0}
    if isinstance(loss_config, str):
        loss_config = {loss_config: 1.0}
    elif isinstance(loss_config, (list, tuple)):
        loss_config = {name: 1.0 for name in loss_config}
    if not isinstance(loss_config, Mapping) or not loss_config:
        raise ValueError(f"loss_config must be a non-empty mapping of loss type to weight, got {loss_config!r}")
    unknown = [name for name in loss_config if name not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown DPO loss type(s) {unknown} in loss_config; known types: {list(LOSS_TYPES)}")
    weights: dict[str, float] = {}
    for name, weight in loss_config.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"loss_config[{name!r}] must be a number, got {weight!r}")
        weights[name] = float(weight)
    return weights


@dataclass
class DPOOutput:
    """One micro-batch's losses and the per-pair quantities behind its metrics.

    ``loss`` is reduced as the loss was asked to (mean / sum over pairs); everything else is per pair
    ``[P]`` and detached except ``pair_losses``. :meth:`metric_sums` gives additive sums so a trainer can
    add them over micro-batches and ranks and divide by the global pair count.
    """

    loss: torch.Tensor
    pair_losses: torch.Tensor
    components: dict[str, torch.Tensor]
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return int(self.pair_losses.numel())

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """Sums over pairs (fp32, detached); divide by ``pairs`` after summing over micro-batches and ranks."""
        c, r = self.chosen_rewards.float(), self.rejected_rewards.float()
        sums = {
            # torch.full is a device-side fill: no host-to-device copy, so no stream sync per micro-batch
            "pairs": torch.full((), float(self.num_pairs), device=c.device),
            "loss": self.pair_losses.detach().float().sum(),
            "rewards/chosen": c.sum(),
            "rewards/rejected": r.sum(),
            "rewards/accuracies": (c > r).float().sum(),
            "rewards/margins": (c - r).sum(),
            "logps/chosen": self.policy_chosen_logps.detach().float().sum(),
            "logps/rejected": self.policy_rejected_logps.detach().float().sum(),
        }
        for name, value in self.components.items():
            sums[f"loss/{name}"] = value.detach().float().sum()
        return sums

    def metrics(self) -> dict[str, float]:
        """Per-pair means of :meth:`metric_sums` for this batch alone (tests, single-process logging)."""
        sums = self.metric_sums()
        pairs = max(float(sums.pop("pairs")), 1.0)
        out = {name: float(value) / pairs for name, value in sums.items()}
        out.update({name: float(value) for name, value in self.extras.items()})
        return out


class DPOLoss(nn.Module):
    """Weighted sum of preference losses (see the module docstring); the registry's ``DPOLoss`` component.

    Args:
        beta: inverse temperature of the implicit reward (and IPO's tau).
        label_smoothing: conservative-DPO ``eps`` for the ``sigmoid`` term (probability the label is flipped).
        loss_config: ``{type: weight}``; default ``{"sigmoid": 1.0}``.
        reduction: ``mean`` (over the batch's pairs), ``sum`` (the trainer divides by the global pair count)
            or ``none``.
        process_group: group over which ``bco_pair``'s running reward mean is reduced (default: world, when
            torch.distributed is initialised). Sequence-parallel duplicates leave a mean unchanged.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_config: Any = None,
                 reduction: str = "mean", process_group: Any = None):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        self.loss_config = parse_loss_config(loss_config)
        self.reduction = reduction
        self.process_group = process_group
        # bco_pair running mean of rewards, kept in float64 so it stays exact over long runs; persistent so
        # a resumed run continues with the same delta.
        self.register_buffer("bco_reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bco_reward_count", torch.zeros((), dtype=torch.float64))

    @property
    def needs_token_counts(self) -> bool:
        return "sft" in self.loss_config

    def extra_repr(self) -> str:
        return f"beta={self.beta}, label_smoothing={self.label_smoothing}, loss_config={self.loss_config}"

    @torch.no_grad()
    def _update_bco_delta(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
        """Fold this batch's rewards (all ranks) into the running mean and return the new mean."""
        stats = torch.stack([
            (chosen_rewards.double().sum() + rejected_rewards.double().sum()),
            torch.full((), float(chosen_rewards.numel() + rejected_rewards.numel()), dtype=torch.float64,
                       device=chosen_rewards.device),
        ])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.process_group)
        stats = stats.to(self.bco_reward_sum.device)
        self.bco_reward_sum += stats[0]
        self.bco_reward_count += stats[1]
        return (self.bco_reward_sum / self.bco_reward_count.clamp_min(1.0)).to(chosen_rewards.device, torch.float32)

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                chosen_token_counts: torch.Tensor | None = None) -> DPOOutput:
        """Losses for ``P`` pairs from ``[P]`` log-prob sums (``chosen_token_counts [P]`` needed for ``sft``)."""
        pi_c, pi_r = policy_chosen_logps.float(), policy_rejected_logps.float()
        ref_c = reference_chosen_logps.to(pi_c.device, torch.float32).detach()
        ref_r = reference_rejected_logps.to(pi_c.device, torch.float32).detach()
        chosen_logratio = pi_c - ref_c
        rejected_logratio = pi_r - ref_r
        z = chosen_logratio - rejected_logratio
        beta = self.beta
        chosen_rewards = beta * chosen_logratio
        rejected_rewards = beta * rejected_logratio

        components: dict[str, torch.Tensor] = {}
        extras: dict[str, torch.Tensor] = {}
        for name in self.loss_config:
            if name == "sigmoid":
                eps = self.label_smoothing
                term = -(1.0 - eps) * F.logsigmoid(beta * z)
                if eps:
                    term = term - eps * F.logsigmoid(-beta * z)
            elif name == "ipo":
                term = (z - 1.0 / (2.0 * beta)) ** 2
            elif name == "hinge":
                term = torch.relu(1.0 - beta * z)
            elif name == "bco_pair":
                if self.training:
                    delta = self._update_bco_delta(chosen_rewards.detach(), rejected_rewards.detach())
                elif bool(self.bco_reward_count > 0):  # evaluation: use the running mean, do not update it
                    delta = (self.bco_reward_sum / self.bco_reward_count).to(chosen_rewards.device, torch.float32)
                else:
                    delta = torch.cat([chosen_rewards, rejected_rewards]).detach().mean()
                term = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
                extras["bco/delta"] = delta.detach()
            else:  # sft
                if chosen_token_counts is None:
                    raise ValueError("the sft term needs chosen_token_counts (trained tokens per chosen response)")
                term = -pi_c / chosen_token_counts.to(pi_c.device, torch.float32).clamp_min(1.0)
            components[name] = term

        pair_losses = sum(weight * components[name] for name, weight in self.loss_config.items())
        if self.reduction == "mean":
            loss = pair_losses.mean() if pair_losses.numel() else pair_losses.sum()
        elif self.reduction == "sum":
            loss = pair_losses.sum()
        else:
            loss = pair_losses
        return DPOOutput(
            loss=loss, pair_losses=pair_losses, components=components,
            chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach(),
            policy_chosen_logps=pi_c.detach(), policy_rejected_logps=pi_r.detach(), extras=extras,
        )
