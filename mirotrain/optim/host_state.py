"""Optimizer state kept in host memory and streamed through the parameters' device, one chunk at a time: what
``CompensatedAdamW(offload_state=True)`` (config key ``optimizer_state_offload``) does with its moments and
compensation buffer, so that only the bf16 weights and gradients (4 of the bf16 mode's 10 bytes per parameter)
stay on the GPU.

Each state tensor gets its own exact-size host allocation, page-locked with one ``cudaHostRegister`` when CUDA
is available (the copies then run at full PCIe speed and asynchronously). Not ``pin_memory=True``: torch's
pinned allocator rounds every block up to a power of two, which would take a third more host memory for the
Qwen3-30B-A3B expert shards (64 experts of 3 x 2048 x 768 per rank: 201 MB in bf16, a 268 MB block) and 72%
more for its embedding's (311 MB, a 512 MB block). A DTensor parameter gets a DTensor state with the same mesh
and placements over the host shard, as FSDP2's ``CPUOffloadPolicy`` keeps its sharded parameters, so step
checkpoints (DCP) store and load it like any sharded optimizer state.

Streaming: before a chunk is updated its state is copied host -> device into one flat buffer per state name, on
a side stream, while the previous chunk computes (``prefetch``, then ``StreamedState`` waits for the copy);
after the update the new state goes back device -> host on the compute stream. The device sees the same bf16
values as if the state had stayed there, so the arithmetic and its results are bit for bit those of the
resident state. ``finish`` waits for the last copies to land before anything on the host (a checkpoint save)
reads the state.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


def _page_lock(buffer: np.ndarray) -> None:
    """Page-lock ``buffer`` for asynchronous CUDA copies until it is freed; on failure it stays pageable (the
    copies are then synchronous and slower, the values the same) and a warning says so."""
    ptr = buffer.ctypes.data
    error = int(torch.cuda.cudart().cudaHostRegister(ptr, buffer.nbytes, 0))
    if error != 0:
        _warn_pageable(error)
        return
    weakref.finalize(buffer, torch.cuda.cudart().cudaHostUnregister, ptr)


@functools.cache
def _warn_pageable(error: int) -> None:
    """Once per error code (a model has thousands of state tensors)."""
    log.warning("Page-locking offloaded optimizer state failed (cudaError %d): its copies to and from the GPU run "
                "from pageable memory (slower, same values).", error)


def host_zeros(shape: Sequence[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A zero host tensor whose storage is exactly its own bytes (page-locked with ``pin``)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(tuple(shape), dtype=dtype)
    buffer = np.zeros(nbytes, dtype=np.uint8)  # the tensor's storage keeps the array (and its page lock) alive
    if pin:
        _page_lock(buffer)
    return torch.from_numpy(buffer).view(dtype).view(tuple(shape))


def host_zeros_like(param: torch.Tensor, pin: bool) -> torch.Tensor:
    """Host zeros shaped like ``param``'s local shard, in its dtype; a DTensor with ``param``'s sharding spec
    (mesh, placements, global shape) over that host shard when ``param`` is one. Built as FSDP2 builds its
    offloaded shards: ``DTensor.from_local`` would move the shard to the mesh's device (the GPU)."""
    if not isinstance(param, DTensor):
        return host_zeros(param.shape, param.dtype, pin)
    return DTensor(host_zeros(param.to_local().shape, param.dtype, pin), param._spec, requires_grad=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class StateStream:
    """Copies chunks of host state to ``device`` (on a side stream where it is CUDA) and results back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def prefetch(self, tensors_by_name: dict[str, list[torch.Tensor]]) -> "StreamedState":
        """Start copying each name's host tensors into one flat device buffer (in their order and dtype)."""
        host = {name: [_local(t) for t in tensors] for name, tensors in tensors_by_name.items()}
        staged = {name: torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=self.device)
                  for name, ts in host.items()}
        ready = None
        if self.copy_stream is not None:
            # The buffers come from the compute stream's pool (a reused block may still be read by kernels queued
            # there), so the copies start after everything queued on it so far.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else nullcontext():
            for name, flat in staged.items():
                _copy_pieces(flat, host[name], to_host=False)
        if self.copy_stream is not None:
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return StreamedState(self.device, staged, ready, host)

    def finish(self) -> None:
        """Wait until the results copied back to the host have landed."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _copy_pieces(flat: torch.Tensor, host: list[torch.Tensor], to_host: bool) -> None:
    """Copy between consecutive pieces of the device buffer ``flat`` and the ``host`` tensors."""
    for piece, h in zip(flat.split([t.numel() for t in host]), host):
        if to_host:
            h.copy_(piece.view_as(h), non_blocking=True)
        else:
            piece.view_as(h).copy_(h, non_blocking=True)


class StreamedState:
    """One chunk's state on the device while it is updated: ``flat`` gives a name's values in fp32 (as the
    resident state's ``torch.cat(...).float()`` does), ``store`` sends new values back to the host tensors."""

    def __init__(self, device: torch.device, staged: dict[str, torch.Tensor], ready: torch.cuda.Event | None,
                 host: dict[str, list[torch.Tensor]]):
        self.device, self.staged, self.ready, self.host = device, staged, ready, host

    def flat(self, name: str) -> torch.Tensor:
        if self.ready is not None:  # the compute stream waits for the side stream's copies
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        return self.staged.pop(name).float()

    def store(self, name: str, flat: torch.Tensor) -> None:
        host = self.host[name]
        _copy_pieces(flat.to(host[0].dtype), host, to_host=True)
