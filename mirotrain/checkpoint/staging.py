"""Host staging of a step checkpoint's state: what an async save blocks the training step for.

The model and optimizer tensors keep their shapes for the whole run, so their host copies live in buffers
allocated once and reused by every save (allocated again only if the layout changed, e.g. a parameter got
optimizer state after the first save). On CUDA the buffers are page-locked, which makes the device-to-host
copy run at full PCIe speed. The small encoded entries (``extra/...``: RNG, dataloader position, scheduler,
step counters) change length from save to save, so they are copied fresh each time.

Why not torch's stagers: ``BlockingAsyncStager`` caches *every* tensor and failed on a 2-GPU run when an
encoded entry grew by one byte; torch 2.11's ``DefaultStager`` failed on the second save of an 8B run
(``KeyError: <class 'type'>``); and both build their buffers by first copying every DTensor to pageable host
memory and then pinning one block per tensor through the caching host allocator (rounded up to a power of
two), which blocked the first save of Qwen3-8B on 4 H100s for 34-49 s.

Here the buffers are a few large chunks (every tensor inside one chunk), filled with zeros and page-locked
with one ``cudaHostRegister`` per chunk, in a background thread that ``prepare`` starts as soon as the
layout is known (the trainer calls it after its first step), so the first save finds them ready.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

# Entries whose tensors keep their shapes between saves (the bulk of the bytes).
FIXED_SHAPE_KEYS = ("model", "optim")
# Bytes per host chunk: one registration each; a larger tensor gets a chunk of its own.
CHUNK_BYTES = 512 * 2**20
# Start of every tensor inside a chunk (a multiple of every dtype's size, and of a cache line).
ALIGN_BYTES = 64


def tensor_layout(state: Any, path: str = "") -> list[tuple]:
    """(path, local shape, dtype) of every tensor in a nested state dict: what the reused buffers must match."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if isinstance(state, DTensor) else state
        return [(path, tuple(local.shape), local.dtype)]
    if isinstance(state, dict):
        return [item for key in sorted(state, key=str) for item in tensor_layout(state[key], f"{path}/{key}")]
    if isinstance(state, (list, tuple)):
        return [item for i, value in enumerate(state) for item in tensor_layout(value, f"{path}/{i}")]
    return []


def _padded_nbytes(shape: tuple, dtype: torch.dtype) -> int:
    nbytes = math.prod(shape) * dtype.itemsize
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def _register(chunk: torch.Tensor, owner: object) -> bool:
    """Page-lock ``chunk`` for CUDA copies, unlocked again when ``owner`` (what every view of the chunk keeps
    alive) is freed; False if the driver refused (the chunk then stays pageable: slower copies, same result)."""
    ptr, nbytes = chunk.data_ptr(), chunk.numel()
    error = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))  # 1: cudaHostRegisterPortable
    if error != 0:
        log.warning("Page-locking %.0f MiB of checkpoint staging memory failed (cudaError %d); async saves copy "
                    "to pageable memory instead (they block the step longer).", nbytes / 2**20, error)
        return False
    weakref.finalize(owner, torch.cuda.cudart().cudaHostUnregister, ptr)
    return True


def _exact_view(chunk: np.ndarray, offset: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``chunk``'s bytes at ``offset`` whose storage is exactly its own bytes: DCP's writer clones
    any tensor whose storage is larger than the tensor (a plain slice would be cloned at every save), and the
    buffer reference keeps the chunk array (and so its page lock) alive as long as the tensor lives."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(memoryview(chunk)[offset:offset + nbytes], dtype=dtype).view(shape)


class HostBuffers:
    """Host copies of a (nested) state dict's tensors, views into a few chunks; DTensors stay DTensors (a CPU
    local shard with the same placement spec), which is what DCP needs to write the shard's offsets.

    Args:
        state: the live state (only shapes, dtypes and DTensor specs are read).
        pin_memory: page-lock the chunks.
        device: the CUDA device whose context registers them (the calling thread may be a new one).
    """

    def __init__(self, state: dict[str, Any], pin_memory: bool, device: torch.device | None = None):
        self.layout = tensor_layout(state)
        sizes = [_padded_nbytes(shape, dtype) for _, shape, dtype in self.layout]
        self._chunks: list[np.ndarray] = []
        self._places: list[tuple[int, int]] = []  # (chunk index, byte offset) of every tensor, in layout order
        chunk_sizes: list[int] = []
        for size in sizes:
            if not chunk_sizes or chunk_sizes[-1] + size > CHUNK_BYTES:
                chunk_sizes.append(0)
            self._places.append((len(chunk_sizes) - 1, chunk_sizes[-1]))
            chunk_sizes[-1] += size
        if pin_memory and device is not None:
            torch.cuda.set_device(device)  # a fresh thread would otherwise open a context on GPU 0
        for size in chunk_sizes:
            chunk = torch.zeros(max(size, 1), dtype=torch.uint8)  # touches every page before it is locked
            array = chunk.numpy()  # the tensor object may die before its views; this array does not
            if pin_memory:
                pin_memory = _register(chunk, owner=array)
            self._chunks.append(array)
        self.tree = self._mirror(state, iter(range(len(self.layout))))

    def _mirror(self, state: Any, index: Any) -> Any:
        if isinstance(state, torch.Tensor):
            local = state.to_local() if isinstance(state, DTensor) else state
            chunk, offset = self._places[next(index)]
            view = _exact_view(self._chunks[chunk], offset, local.shape, local.dtype)
            return DTensor(view, state._spec, requires_grad=False) if isinstance(state, DTensor) else view
        if isinstance(state, dict):
            return {key: self._mirror(state[key], index) for key in sorted(state, key=str)}
        if isinstance(state, (list, tuple)):
            return type(state)(self._mirror(value, index) for value in state)
        return state

    def fill(self, state: Any, buffers: Any = None) -> Any:
        """Copy ``state``'s tensors into the buffers (blocking) and return the buffer tree with ``state``'s
        non-tensor values."""
        buffers = self.tree if buffers is None else buffers
        if isinstance(state, torch.Tensor):
            source = state.to_local() if isinstance(state, DTensor) else state
            target = buffers.to_local() if isinstance(buffers, DTensor) else buffers
            target.copy_(source)
            return buffers
        if isinstance(state, dict):
            return {key: self.fill(value, buffers[key]) for key, value in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self.fill(value, buffer) for value, buffer in zip(state, buffers))
        return state


class ReusedBufferStager(AsyncStager):
    """Copies the state to host memory and returns the copy (the save thread writes it while training goes on).

    Args:
        pin_memory: page-lock the reused buffers (only where a CUDA device exists).
        device: the training device (its CUDA context registers the buffers).
    """

    _synchronize_after_execute: bool = False

    def __init__(self, pin_memory: bool, device: torch.device | None = None):
        self.pin_memory = pin_memory
        self.device = device
        self._buffers: HostBuffers | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def prepare(self, state_dict: dict[str, Any]) -> None:
        """Allocate (and pin) the buffers for ``state_dict``'s layout in a background thread."""
        fixed = _fixed(state_dict)
        self._thread = threading.Thread(target=self._allocate, args=(fixed,), name="checkpoint-staging-alloc",
                                        daemon=True)
        self._thread.start()

    def _allocate(self, fixed: dict[str, Any]) -> None:
        try:
            self._buffers = None  # release the old buffers before allocating new ones
            self._buffers = HostBuffers(fixed, self.pin_memory, self.device)
        except BaseException as error:  # noqa: BLE001 - surfaced by the next stage() in the training thread
            self._error = error

    def _ready_buffers(self, fixed: dict[str, Any]) -> HostBuffers:
        self._join()
        self._raise_allocation_error()
        if self._buffers is None or self._buffers.layout != tensor_layout(fixed):  # first save, or state grew
            self._allocate(fixed)
            self._raise_allocation_error()
        return self._buffers

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _raise_allocation_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("allocating the host buffers for async checkpointing failed") from error

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        fixed = _fixed(state_dict)
        staged = self._ready_buffers(fixed).fill(fixed)
        for key, value in state_dict.items():
            if key not in fixed:
                staged[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
        return staged

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` returns once the copy is done."""

    def close(self) -> None:
        self._join()
        self._buffers = None


def _fixed(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if k in FIXED_SHAPE_KEYS}
