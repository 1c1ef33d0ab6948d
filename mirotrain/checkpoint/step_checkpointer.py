"""Asynchronous DCP step checkpoints for auto-resume (the same mechanism serves SFT and DPO).

Save (every rank, at a step boundary): the state is copied to reused host buffers (pinned on CUDA; see
``staging.py``), so a step is blocked only for the device-to-host copy, and written by a background thread
through DCP on a dedicated gloo group (it must not interleave with the training collectives). When the write finished on every rank (DCP's final gather
proves it on rank 0), rank 0 writes the ``COMPLETE`` manifest, logs
``Step-based checkpoint is saved asynchronously to PATH successfully.`` and applies retention. A save that
finds the previous one still running waits for it, with a warning.

Load: rank 0 picks the newest intact checkpoint (incomplete or damaged ones are skipped with a warning naming
them), every rank reads its shards through DCP, which also reshards model and optimizer state when the world
size changed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from mirotrain.checkpoint.host_memory import (
    HostMemoryError, HostMemoryPlan, available_host_bytes, local_world_size, plan_host_memory, staged_bytes,
)
from mirotrain.checkpoint.staging import FIXED_SHAPE_KEYS, ReusedBufferStager
from mirotrain.checkpoint.layout import (
    META, CheckpointInputError, StepDir, apply_retention, list_step_dirs, mirotrain_refusal, mirotrain_step_dirs,
    newest_valid, read_meta, step_path, write_marker,
)

log = logging.getLogger(__name__)

SAVED_LINE = "Step-based checkpoint is saved asynchronously to {path} successfully."


class StepCheckpointer:
    """Writes and finds ``{root}/step_{N}`` checkpoints.

    Args:
        root: ``{output_dir}/checkpoints``.
        keep_last_n: complete checkpoints to keep (the newest complete one is never deleted).
        async_save: write in the background (default) or block until written.
        device: the training device (decides the staging strategy).
    """

    def __init__(self, root: str | Path, keep_last_n: int = 2, async_save: bool = True,
                 device: torch.device = torch.device("cpu")):
        self.root = Path(root)
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self.device = device
        self.rank = dist.get_rank()
        # A gloo group of its own: the background writer's collectives must not interleave with training's.
        self.group = dist.new_group(backend="gloo")
        self._stager = ReusedBufferStager(pin_memory=device.type == "cuda", device=device) if async_save else None
        self._pending: Future | None = None
        self._pending_path: Path | None = None
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self.last_error: BaseException | None = None
        self.blocked_seconds: list[float] = []
        self.prepared = False

    # ------------------------------------------------------------------------------------------ find

    def find_latest(self) -> StepDir | None:
        """Newest intact checkpoint, agreed by all ranks (rank 0 looks; invalid newer ones are removed).

        Where there is none but the output_dir (``root``'s parent) holds MiroTrain step checkpoints
        (``epoch_E/step_S``), every rank raises :class:`CheckpointInputError` saying what to run instead:
        training from scratch there would silently ignore them."""
        choice, refusal = None, None
        if self.rank == 0:
            found = newest_valid(self.root, remove_invalid_newer=True)
            choice = None if found is None else (found.step, str(found.path))
            originals = mirotrain_step_dirs(self.root.parent) if found is None else []
            refusal = mirotrain_refusal(originals[-1]) if originals else None
        holder = [choice, refusal]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        if holder[1] is not None:
            raise CheckpointInputError(holder[1])
        return None if holder[0] is None else StepDir(holder[0][0], Path(holder[0][1]))

    # ------------------------------------------------------------------------------------------ save

    def prepare(self, state: dict[str, Any]) -> None:
        """Decide the save mode from the node's host memory (``host_memory.py``: async, sync, or a refusal when
        not even the checkpoint files of a tmpfs directory fit) and start allocating the async host buffers in
        the background, so the first save does not wait for them. Collective; call once the optimizer state
        exists (the trainer does after its first step); ``save`` calls it if nobody did."""
        if self.prepared:
            return
        self.prepared = True
        mode = self._agree_on_save_mode(state)
        if mode != "async":
            self.async_save, self._stager = False, None
            return
        self._stager.prepare(state)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Checkpoint ``state`` (a DCP state dict) as step ``step``; returns once staged (async) or written."""
        self.wait(warn=True)
        self.prepare(state)
        path = step_path(self.root, step)
        start = time.perf_counter()
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            (path / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        writer = FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True, overwrite=True)
        if not self.async_save:
            dcp.save(state, storage_writer=writer, process_group=self.group)
            self._finish(step, path, asynchronous=False)
            self.blocked_seconds.append(time.perf_counter() - start)
            return
        # returns once the state is staged to host memory; the write goes on in DCP's background thread
        upload = dcp.async_save(state, storage_writer=writer, process_group=self.group, async_stager=self._stager)
        self._pending, self._pending_path, self._finished = upload, path, threading.Event()
        upload.add_done_callback(lambda fut, s=step, p=path, f=self._finished: self._on_upload_done(fut, s, p, f))
        self.blocked_seconds.append(time.perf_counter() - start)

    def host_memory_plan(self, state: dict[str, Any]) -> HostMemoryPlan:
        """This node's host memory for the checkpoints of ``state`` (its ranks' shares: every rank of a node
        holds about the same)."""
        per_rank = staged_bytes(state, FIXED_SHAPE_KEYS)
        node = per_rank * local_world_size()
        return plan_host_memory(self.root, staging=node if self.async_save else 0, checkpoint=node,
                                keep_last_n=self.keep_last_n, available=available_host_bytes())

    def _agree_on_save_mode(self, state: dict[str, Any]) -> str:
        """async, sync or raise :class:`HostMemoryError`; agreed by all ranks (one mode for everyone)."""
        plan = self.host_memory_plan(state)
        mode = plan.mode(self.async_save)
        modes = ("refuse", "sync", "async")
        flag = torch.tensor([modes.index(mode)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        agreed = modes[int(flag.item())]
        if agreed == "refuse":
            raise HostMemoryError(plan.refusal() if mode == "refuse" else
                                  "step checkpoints do not fit in the host memory of another node (see its error)")
        if agreed == "sync" and self.async_save and mode == "sync" and os.environ.get("LOCAL_RANK", "0") == "0":
            log.warning(plan.fallback())
        return agreed

    def wait(self, warn: bool = False) -> None:
        """Block until the pending save (if any) is persisted and finished (COMPLETE, retention); re-raise
        its error."""
        pending, finished = self._pending, self._finished
        if pending is None:
            return
        if warn and not pending.done():
            log.warning("The previous step-based checkpoint (%s) has not finished; checkpointing frequency is too "
                        "high for the storage. Waiting for it...", self._pending_path)
        # The future is done before its callbacks have run: wait for the marker and retention as well.
        pending.exception()
        finished.wait()
        self._pending = None
        if self.last_error is not None:
            error, self.last_error = self.last_error, None
            raise RuntimeError(f"step checkpoint {self._pending_path} failed") from error

    def _on_upload_done(self, fut: Future, step: int, path: Path, finished: threading.Event) -> None:
        try:
            error = fut.exception()
            if error is not None:
                self.last_error = error
                log.error("Rank %d: step-based checkpoint %s failed: %r", self.rank, path, error)
                return
            self._finish(step, path, asynchronous=True)
        except BaseException as error:  # noqa: BLE001 - a failed marker/retention must reach wait(), not vanish
            self.last_error = error
            log.error("Rank %d: finishing step-based checkpoint %s failed: %r", self.rank, path, error)
        finally:
            finished.set()

    def _finish(self, step: int, path: Path, asynchronous: bool) -> None:
        # DCP's save ends with a gather of every rank's write results on rank 0 before .metadata is written,
        # so when rank 0 gets here all ranks' files are persisted.
        if self.rank != 0:
            return
        with self._lock:
            write_marker(path)
            if asynchronous:
                log.info(SAVED_LINE.format(path=path))
            else:
                log.info("Step-based checkpoint is saved to %s successfully.", path)
            for removed in apply_retention(self.root, self.keep_last_n, step):
                log.info("Removed old step checkpoint %s", removed)

    # ------------------------------------------------------------------------------------------ load

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Fill ``state`` in place from checkpoint ``path`` (DTensors read only their shards)."""
        dcp.load(state, storage_reader=FileSystemReader(str(path)), process_group=self.group)

    @staticmethod
    def tensor_sizes(path: Path, prefix: str) -> dict[str, list[int]]:
        """Sizes of the plain tensors stored under keys starting with ``prefix`` (to allocate before load)."""
        metadata = FileSystemReader(str(path)).read_metadata()
        out = {}
        for key, item in metadata.state_dict_metadata.items():
            if key.startswith(prefix) and hasattr(item, "size"):
                out[key] = list(item.size)
        return out

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        return read_meta(path)

    def existing_steps(self) -> list[int]:
        return [d.step for d in list_step_dirs(self.root)]

    def close(self) -> None:
        """Wait for the pending save and release staging buffers."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
