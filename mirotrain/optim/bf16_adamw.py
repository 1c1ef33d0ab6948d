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

The update runs on local shards (FSDP2 DTensors are updated through ``to_local()``); its arithmetic is one
function, ``compensated_adamw_``, run one of two ways:

- ``compiled`` (the trainer's default on GPUs, config ``compile``): torch.compile turns the function into one
  kernel, called once per parameter shard: it reads the weight, gradient and state (10 bytes per element) and
  writes them back (8 bytes), ~8 ms for 1.7B parameters on an H200. Eager, the same arithmetic is about twenty
  memory-bound passes: 121 ms of a 0.62 s Qwen3-1.7B step (docs/benchmarks.md, sixth session). The compiled
  kernel draws the stochastic rounding's bits from Inductor's generator (seeded from the device's default
  generator, so still restored by step checkpoints) and rounds like eager code (``emulate_precision_casts``:
  without it Inductor keeps the bf16-rounded weight in fp32 and the compensation comes out zero).
- eager: the shards of up to ``CHUNK_ELEMENTS`` parameters' elements are concatenated into flat fp32 buffers,
  updated with a few dozen kernels per chunk (a per-parameter loop would launch ~20 kernels for each of a 0.6B
  model's ~300 tensors every step) and copied back with ``_foreach_copy_``. The extra memory is ~42 bytes per
  element of one chunk on a GPU (about 2.6 GiB; mirotrain/commands/step_memory.py:
  ``compensated_bytes_per_element``), never a copy of the model.

With ``offload_state`` (config key ``optimizer_state_offload``) the moments and the compensation buffer, 6 of the
10 bytes per parameter, live in host memory and pass through the device chunk by chunk: each chunk's state is
copied in before its update and back after it (mirotrain/optim/host_state.py), so the device holds the bf16
weights and gradients and one or two chunks' state. The arithmetic is the same, on the same device, with the
same random bits: a run with the state offloaded is bitwise equal to one without. Offloaded chunks always take
the flat buffers (compiled or not: the stream copies whole chunks).

Why not a library: torchao 0.18 has stochastic rounding only in the private ``torchao.optim._AdamW`` (documented
for its quantized training), compiles every parameter shape with torch.compile (59 s for a two-layer toy on
CPU) and is not in the GPU image; torch-optimi 0.3.3's Kahan AdamW fails on FSDP2 parameters
(``aten._foreach_copy_`` has no DTensor sharding strategy), keeps its step counter as a tensor in the param
groups (which step checkpoints store as JSON) and applies weight decay outside the compensation.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from mirotrain.optim.host_state import StateStream, StreamedState, host_zeros_like

# fp32 bits below a bf16's mantissa
_LOW_BITS = 16
# elements updated together: the flat fp32 buffers of one chunk and the update's temporaries are ~42 bytes per
# element (2.6 GiB)
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


def compensated_adamw_(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        compensation: torch.Tensor, coefficients: torch.Tensor, beta1: float, beta2: float,
                        eps: float, dtype: torch.dtype) -> None:
    """One compensated AdamW step, in place, of tensors of one shape (a parameter's shards, or flat fp32 buffers
    of a chunk's shards), computed in fp32; ``dtype`` is what the weights are kept in (their rounding, and
    stochastic rounding of the second moment when it is bf16). ``coefficients`` holds the step's scalars that
    change from step to step, as a tensor on the weights' device so the compiled kernel is built once:
    ``-lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)`` and ``lr · weight_decay``.

        update = -lr · (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) - lr · wd · weight
        weight + compensation + update  ->  rounded to ``dtype``, and what that rounding dropped
    """
    step_size, bias2_sqrt, decay = coefficients[0], coefficients[1], coefficients[2]
    g = grad.float()
    m = exp_avg.float().lerp(g, 1 - beta1)
    v = exp_avg_sq.float().mul(beta2).addcmul(g, g, value=1 - beta2)
    exp_avg.copy_(m)  # rounded to nearest
    exp_avg_sq.copy_(stochastic_round_bf16(v) if dtype == torch.bfloat16 else v)
    old = weight.float()
    update = m / (v.sqrt() / bias2_sqrt + eps) * step_size - decay * old + compensation.float()
    total = old + update  # the exact new weights, in fp32
    rounded = total.to(dtype)
    weight.copy_(rounded)
    compensation.copy_(total - rounded)  # what the rounding dropped, carried to the next step


@functools.cache
def compiled_compensated_adamw() -> Callable[..., None]:
    """``compensated_adamw_`` as one kernel for shards of any length (built at the first call)."""
    return torch.compile(compensated_adamw_, dynamic=True, fullgraph=True,
                         options={"emulate_precision_casts": True})


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


# the state tensors of a parameter besides its step counter, all in the parameter's dtype
STATE_NAMES = ("exp_avg", "exp_avg_sq", "compensation")


class _ResidentState:
    """A chunk's state where its parameters are: read into fp32 flat buffers, written back in place."""

    def __init__(self, states: list[dict]):
        self.states = states

    def flat(self, name: str) -> torch.Tensor:
        return _flat([s[name] for s in self.states])

    def store(self, name: str, flat: torch.Tensor) -> None:
        _write_back([s[name] for s in self.states], flat)


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, torch's update formula) for bf16 parameters with
    a compensated weight update; see the module docstring. State per parameter: ``step`` (fp32 scalar, as
    torch's AdamW), ``exp_avg``, ``exp_avg_sq`` and ``compensation``, all in the parameter's dtype.

    ``offload_state``: the three state tensors live in host memory (page-locked where the parameter is on a
    GPU) and each step streams them through the parameter's device chunk by chunk
    (mirotrain/optim/host_state.py); the results are bitwise those of the resident state.

    ``compiled``: the update is one torch.compile'd kernel per parameter shard (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, offload_state: bool = False, compiled: bool = False):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"CompensatedAdamW: invalid lr={lr}, betas={betas}, eps={eps} or "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.offload_state = offload_state
        self.compiled = compiled
        self._step_fn = compiled_compensated_adamw() if compiled else compensated_adamw_
        self._streams: dict[torch.device, StateStream] = {}

    def _zeros_like(self, p: torch.Tensor) -> torch.Tensor:
        if self.offload_state:
            return host_zeros_like(p, pin=local_shard(p).device.type == "cuda")
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[tuple[list[torch.Tensor], dict, int]] = []
        for group in self.param_groups:
            # parameters that can share flat buffers: same device and dtype, same step count (bias correction)
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for name in STATE_NAMES:
                        state[name] = self._zeros_like(p)
                state["step"] += 1
                shard = local_shard(p)
                buckets[(shard.device, shard.dtype, int(state["step"].item()))].append(p)  # CPU step: no sync
            work.extend((chunk, group, t) for (_, _, t), params in buckets.items() for chunk in _chunks(params))
        if self.offload_state:
            self._update_streamed(work)
        else:
            for chunk, group, t in work:
                if self.compiled:
                    self._update_shards(chunk, group, t)
                else:
                    self._update(chunk, group, t, _ResidentState([self.state[p] for p in chunk]))
        return loss

    def _update_streamed(self, work: list[tuple[list[torch.Tensor], dict, int]]) -> None:
        """``_update`` of every chunk with its state fetched from the host, the next chunk's fetch overlapping
        this chunk's update; returns once the new state is back in host memory."""
        def fetch(chunk: list[torch.Tensor]) -> StreamedState:
            device = local_shard(chunk[0]).device
            stream = self._streams.setdefault(device, StateStream(device))
            return stream.prefetch({name: [self.state[p][name] for p in chunk] for name in STATE_NAMES})

        pending = fetch(work[0][0]) if work else None
        for i, (chunk, group, t) in enumerate(work):
            current, pending = pending, fetch(work[i + 1][0]) if i + 1 < len(work) else None
            self._update(chunk, group, t, current)
        for stream in self._streams.values():
            stream.finish()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except that with ``offload_state`` the loaded state is copied into the host tensors
        (torch's load moves every state tensor to its parameter's device: the whole state onto the GPU)."""
        if not self.offload_state:
            super().load_state_dict(state_dict)
            return
        params = {pid: p for group, saved in zip(self.param_groups, state_dict["param_groups"])
                  for pid, p in zip(saved["params"], group["params"])}
        held = {pid: {k: v for k, v in values.items() if k in STATE_NAMES}
                for pid, values in state_dict["state"].items()}
        live = {p: dict(values) for p, values in self.state.items()}
        super().load_state_dict({**state_dict, "state": {
            pid: {k: v for k, v in values.items() if k not in STATE_NAMES} for pid, values in state_dict["state"].items()}})
        for pid, values in held.items():
            p = params[pid]
            for name, value in values.items():
                target = live.get(p, {}).get(name)
                if target is None or local_shard(target).shape != local_shard(value).shape:
                    target = self._zeros_like(p)
                if target is not value:  # a checkpoint loaded in place (DCP) hands back the live tensors
                    local_shard(target).copy_(local_shard(value))
                self.state[p][name] = target

    def _update(self, params: list[torch.Tensor], group: dict, t: int,
                state: _ResidentState | StreamedState) -> None:
        """One AdamW step of ``params`` (their ``t``-th) on flat fp32 copies of their shards and of their state
        (``state``: where it lives, on their device or streamed from the host)."""
        weights, grad = _flat(params), _flat([p.grad for p in params])
        flats = {name: state.flat(name) for name in STATE_NAMES}
        self._step_fn(weights, grad, *flats.values(), _coefficients(group, t, weights.device), *group["betas"],
                      group["eps"], local_shard(params[0]).dtype)
        del grad
        for name, flat in flats.items():
            state.store(name, flat)
        _write_back(params, weights)

    def _update_shards(self, params: list[torch.Tensor], group: dict, t: int) -> None:
        """One AdamW step of ``params`` (their ``t``-th), the compiled kernel once per parameter on its shard and
        its state in place."""
        coefficients = _coefficients(group, t, local_shard(params[0]).device)
        for p in params:
            weight = local_shard(p)
            if weight.numel() == 0:  # an uneven dim-0 split can leave a rank no rows
                continue
            state = [local_shard(self.state[p][name]).view(-1) for name in STATE_NAMES]
            self._step_fn(weight.view(-1), local_shard(p.grad).view(-1), *state, coefficients, *group["betas"],
                          group["eps"], weight.dtype)


def _coefficients(group: dict, t: int, device: torch.device) -> torch.Tensor:
    """``compensated_adamw_``'s per-step scalars for a parameter group at its ``t``-th step, on ``device``. To a
    GPU they go from page-locked memory without blocking: a blocking copy would wait for the queued backward,
    and the optimizer's launches could no longer overlap it."""
    lr, (beta1, beta2) = float(group["lr"]), group["betas"]
    values = torch.tensor([-lr / (1 - beta1**t), math.sqrt(1 - beta2**t), lr * group["weight_decay"]],
                          dtype=torch.float32)
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)
