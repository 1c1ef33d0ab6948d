"""AdamW for bf16 parameters that keeps updates smaller than half a bf16 ulp of the weight: 10 bytes per
parameter (bf16 weight, gradient, two moments and a compensation buffer).

Rounding an updated bf16 weight to nearest drops any update below half its ulp (2^-9 relative: a weight of
1.0 ignores every step under ~0.002), so plain bf16 AdamW stops learning once ``lr`` is small against the
weights. Here each step adds the update and the compensation buffer (what earlier roundings dropped) to the
weight in fp32, rounds the sum to bf16 and keeps what that rounding dropped in the buffer: a compensated
(Kahan) sum, so the bf16 weight plus its buffer follow the exact trajectory to about 2^-17 relative. Weight
decay is part of that update (it is as small as the update itself).

The moments are bf16 as well. The first moment is rounded to nearest: its step ``(1 - beta1)·(g - m)`` is a
tenth of its own change, lost only when the gradient already agrees with ``m`` to ~4%. The second moment moves
by ``(1 - beta2)`` = 0.1% per step (beta2 = 0.999), far below its own half-ulp, so rounded to nearest it could
only grow (never decay after a spike); it is stochastically rounded instead (rounded up with the probability
of the dropped fraction, so its expected value is exact), with random bits from the device's default
generator, which step checkpoints save and restore per rank: a resumed run stays bitwise equal.

Each parameter's update runs on its local shard (FSDP2 DTensors are updated through ``to_local()``), in fp32
temporaries of that one shard, so the extra memory is a few copies of the largest shard, never of the model.

Why not a library: torchao 0.18 has stochastic rounding only in the private ``torchao.optim._AdamW`` (documented
for its quantized training), compiles every parameter shape with torch.compile (59 s for a two-layer toy on
CPU) and is not in the GPU image; torch-optimi 0.3.3's Kahan AdamW fails on FSDP2 parameters
(``aten._foreach_copy_`` has no DTensor sharding strategy), keeps its step counter as a tensor in the param
groups (which step checkpoints store as JSON) and applies weight decay outside the compensation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

# fp32 bits below a bf16's mantissa
_LOW_BITS = 16


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def stochastic_round_(out: torch.Tensor, value: torch.Tensor) -> None:
    """``out`` (bf16) = ``value`` (fp32, left as it is) rounded up or down to a neighbouring bf16, up with the probability of
    the fraction rounding down would drop: add 16 random bits below the bf16 mantissa, then truncate."""
    bits = value.view(torch.int32)
    bits = (bits + torch.randint_like(bits, 1 << _LOW_BITS)).bitwise_and_(-(1 << _LOW_BITS))
    out.copy_(bits.view(torch.float32))  # exact: the low bits are zero


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, torch's update formula) for bf16 parameters with
    a compensated weight update; see the module docstring. State per parameter: ``step`` (fp32 scalar, as
    torch's AdamW), ``exp_avg``, ``exp_avg_sq`` and ``compensation``, all in the parameter's dtype."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"CompensatedAdamW: invalid lr={lr}, betas={betas}, eps={eps} or "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for name in ("exp_avg", "exp_avg_sq", "compensation"):
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = int(state["step"].item())  # a CPU tensor: no device sync
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        # fp32 copies (``copy=True``: an fp32 state must not be changed in place through them)
        weight, exp_avg, exp_avg_sq = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        compensation = _local(state["compensation"])

        grad = _local(p.grad).float()
        m = exp_avg.to(torch.float32, copy=True).lerp_(grad, 1 - beta1)
        exp_avg.copy_(m)
        v = exp_avg_sq.to(torch.float32, copy=True).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        del grad
        stochastic_round_(exp_avg_sq, v)
        # update = -lr · (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) - lr · wd · weight
        update = m.div_(v.sqrt_().div_(math.sqrt(1 - beta2**t)).add_(eps)).mul_(-lr / (1 - beta1**t))
        del v
        old = weight.to(torch.float32, copy=True)
        if wd:
            update.add_(old, alpha=-lr * wd)
        update.add_(compensation)
        total = old.add_(update)          # the exact new weight, in fp32
        weight.copy_(total)               # rounded to bf16
        compensation.copy_(total.sub_(weight))  # what the rounding dropped, carried to the next step
