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

The update runs on local shards (FSDP2 DTensors are updated through ``to_local()``), fused in Python: the
shards of up to ``CHUNK_ELEMENTS`` parameters' elements are concatenated into flat fp32 buffers, updated with a
few dozen kernels per chunk (not per parameter: a per-parameter loop launched ~20 kernels for each of a 0.6B
model's ~300 tensors every step) and copied back with ``_foreach_copy_``. The extra memory is ~30 bytes per
element of one chunk (about 2 GiB), never a copy of the model.

Why not a library: torchao 0.18 has stochastic rounding only in the private ``torchao.optim._AdamW`` (documented
for its quantized training), compiles every parameter shape with torch.compile (59 s for a two-layer toy on
CPU) and is not in the GPU image; torch-optimi 0.3.3's Kahan AdamW fails on FSDP2 parameters
(``aten._foreach_copy_`` has no DTensor sharding strategy), keeps its step counter as a tensor in the param
groups (which step checkpoints store as JSON) and applies weight decay outside the compensation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

# fp32 bits below a bf16's mantissa
_LOW_BITS = 16
# elements updated together: the flat fp32 buffers of one chunk are ~30 bytes per element (2 GiB)
CHUNK_ELEMENTS = 1 << 26


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (an FSDP2 DTensor's local shard, which in-place updates change)."""
    return t.to_local() if isinstance(t, DTensor) else t


def stochastic_round_bf16(value: torch.Tensor) -> torch.Tensor:
    """``value`` (fp32, left as it is) rounded to bf16 up or down, up with the probability of the fraction that
    rounding down would drop: 16 random bits are added below the bf16 mantissa, then truncated."""
    bits = value.view(torch.int32)
    bits = (bits + torch.randint_like(bits, 1 << _LOW_BITS)).bitwise_and_(-(1 << _LOW_BITS))
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The local shards of ``tensors`` concatenated into one new fp32 buffer."""
    return torch.cat([local_shard(t).reshape(-1) for t in tensors]).float()


def _write_back(targets: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive pieces of ``flat`` into the local shards of ``targets`` (cast to their dtype)."""
    shards = [local_shard(t) for t in targets]
    flat = flat.to(shards[0].dtype)
    pieces = flat.split([s.numel() for s in shards])
    torch._foreach_copy_(shards, [piece.view_as(s) for piece, s in zip(pieces, shards)])


def _chunks(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``params`` in consecutive groups of at most ``CHUNK_ELEMENTS`` local elements (a larger one alone)."""
    chunk: list[torch.Tensor] = []
    size = 0
    for p in params:
        n = local_shard(p).numel()
        if chunk and size + n > CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += n
    if chunk:
        yield chunk


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
            # parameters that can share flat buffers: same device and dtype, same step count (bias correction)
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for name in ("exp_avg", "exp_avg_sq", "compensation"):
                        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                shard = local_shard(p)
                buckets[(shard.device, shard.dtype, int(state["step"].item()))].append(p)  # CPU step: no sync
            for (_, _, t), params in buckets.items():
                for chunk in _chunks(params):
                    self._update(chunk, group, t)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict, t: int) -> None:
        """One AdamW step of ``params`` (their ``t``-th) on flat fp32 copies of their shards."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self.state[p] for p in params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        compensations = [s["compensation"] for s in states]

        grad = _flat([p.grad for p in params])
        m = _flat(exp_avgs).lerp_(grad, 1 - beta1)
        _write_back(exp_avgs, m)  # rounded to nearest
        v = _flat(exp_avg_sqs).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        del grad
        _write_back(exp_avg_sqs, stochastic_round_bf16(v) if exp_avg_sqs[0].dtype == torch.bfloat16 else v)
        # update = -lr · (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) - lr · wd · weight
        update = m.div_(v.sqrt_().div_(math.sqrt(1 - beta2**t)).add_(eps)).mul_(-lr / (1 - beta1**t))
        del v
        old = _flat(params)
        if wd:
            update.add_(old, alpha=-lr * wd)
        update.add_(_flat(compensations))
        total = old.add_(update)                 # the exact new weights, in fp32
        rounded = total.to(local_shard(params[0]).dtype)
        _write_back(params, rounded)
        _write_back(compensations, total.sub_(rounded))  # what the rounding dropped, carried to the next step
