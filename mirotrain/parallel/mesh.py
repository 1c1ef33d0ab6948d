"""Parallel layout: data parallel × Ulysses sequence parallel (× expert parallel), as device meshes.

Rank layout. Global rank ``g = dp_rank * sp + sp_rank``: the ranks of one SP group are *contiguous*, so on
a node with 8 GPUs and ``sp <= 8`` every all-to-all of the sequence exchange stays on NVLink. All ranks of
one SP group read the same packed row from the data loader (they each keep 1/sp of its columns, see
:func:`mirotrain.parallel.ulysses.shard_batch_for_sp`), so the data loader must be built with
``dp_rank = g // sp`` and ``dp_size = world // sp`` — :meth:`ParallelDims.dp_rank` / :attr:`dp_size`.

FSDP shards parameters over *all* ``dp × sp`` ranks (the flattened ``"dp_sp"`` mesh): SP ranks hold the same
parameters and each produces a partial gradient for the shared row, so they belong to the same gradient
reduction as the DP replicas (see ``mirotrain.parallel.ulysses`` for the exact loss scaling).

Everything that can be wrong with the layout is checked here, on plain integers, *before* any process
group or GPU memory exists: world size divisibility, attention-head divisibility, the GQA grouping, and
whether the attention backend works under SP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mirotrain.modules.attention import BACKENDS, resolve_backend

# Backends whose kernels see the gathered full sequence with the *global* cu_seqlens. Every backend of
# mirotrain.modules.attention qualifies numerically; on CUDA the dense-mask "sdpa" path is refused (below).
SP_ATTENTION_BACKENDS = ("flash", "varlen", "sdpa")


class ParallelConfigError(ValueError):
    """An impossible or unsupported parallel layout; the message names the setting to change."""


def kv_replication_factor(n_heads: int, n_kv_heads: int, sp: int) -> int:
    """How many copies of each KV head the sequence exchange sends (1 = none); raises on bad layouts.

    Rank ``r`` of the SP group receives q heads ``[r·H/sp, (r+1)·H/sp)``. When ``n_kv_heads >= sp`` the KV
    heads are exchanged as they are (rank ``r`` gets ``[r·KV/sp, (r+1)·KV/sp)``, exactly the ones its q heads
    use). When ``sp > n_kv_heads`` a rank's q heads all share one KV head, and each KV head must reach
    ``sp / KV`` ranks: that is the minimal replication, and the only one done.
    """
    if sp < 1:
        raise ParallelConfigError(f"ulysses_sequence_parallel_size must be >= 1, got {sp}")
    if n_heads % n_kv_heads:
        raise ParallelConfigError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if n_heads % sp:
        raise ParallelConfigError(
            f"ulysses_sequence_parallel_size={sp} must divide the number of attention heads ({n_heads}); "
            f"valid sizes: {[d for d in range(1, n_heads + 1) if n_heads % d == 0]}"
        )
    if n_kv_heads >= sp:
        if n_kv_heads % sp:
            raise ParallelConfigError(
                f"ulysses_sequence_parallel_size={sp} must divide the number of KV heads ({n_kv_heads}) "
                f"when it does not exceed it, so that each rank's query heads map onto whole KV heads"
            )
        return 1
    if sp % n_kv_heads:
        raise ParallelConfigError(
            f"ulysses_sequence_parallel_size={sp} exceeds the number of KV heads ({n_kv_heads}) and must then "
            f"be a multiple of it (each KV head is replicated sp/KV times)"
        )
    return sp // n_kv_heads


def check_sp_attention_backend(backend: str, device_type: str, sp: int) -> str:
    """Resolve the attention backend and refuse the ones that cannot run under SP; returns the resolved name.

    Under SP the kernel runs over the *full* gathered sequence. The ``sdpa`` backend builds a dense
    ``[T, T]`` block-diagonal mask for packed rows: fine for CPU tests, but on CUDA at the lengths SP exists
    for (64K+ tokens: a 4 GiB+ mask per layer call) it is an out-of-memory in disguise, so it is refused there.
    """
    if backend not in BACKENDS:
        raise ParallelConfigError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    try:
        resolved = resolve_backend(backend, torch.device(device_type))
    except ValueError as err:
        raise ParallelConfigError(str(err)) from err
    if sp > 1 and resolved not in SP_ATTENTION_BACKENDS:
        raise ParallelConfigError(
            f"attention backend {resolved!r} does not support sequence parallelism; use one of {SP_ATTENTION_BACKENDS}"
        )
    if sp > 1 and device_type == "cuda" and resolved == "sdpa":
        raise ParallelConfigError(
            "ulysses_sequence_parallel_size > 1 on CUDA needs a varlen attention backend ('varlen' or 'flash'): "
            "'sdpa' materialises a [T, T] mask over the full sequence. Set attention_backend to 'auto' or 'varlen'."
        )
    return resolved


@dataclass
class ParallelDims:
    """Degrees of parallelism. ``dp`` = number of data-parallel replicas (groups that read distinct rows).

    ``dp * sp == world_size``; ``dp=-1`` means "whatever is left" (``world_size // sp``). ``ep`` (expert
    parallelism, MoE) is laid out independently over the same ranks: ``world_size % ep == 0``.
    """

    world_size: int
    dp: int = -1
    sp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ParallelConfigError(f"world_size must be >= 1, got {self.world_size}")
        if self.sp < 1 or self.ep < 1:
            raise ParallelConfigError(f"sp and ep must be >= 1, got sp={self.sp}, ep={self.ep}")
        if self.world_size % self.sp:
            raise ParallelConfigError(
                f"ulysses_sequence_parallel_size={self.sp} must divide the world size ({self.world_size} processes)"
            )
        if self.dp == -1:
            self.dp = self.world_size // self.sp
        if self.dp * self.sp != self.world_size:
            raise ParallelConfigError(
                f"dp ({self.dp}) × sp ({self.sp}) must equal the world size ({self.world_size})"
            )
        if self.world_size % self.ep:
            raise ParallelConfigError(f"expert parallel size ep={self.ep} must divide the world size ({self.world_size})")

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def dp_size(self) -> int:
        """Number of distinct row streams: what the data loader calls ``dp_size``."""
        return self.dp

    def dp_rank(self, rank: int) -> int:
        """Data-loader rank of global ``rank``: every rank of one SP group reads the same rows."""
        self._check_rank(rank)
        return rank // self.sp

    def sp_rank(self, rank: int) -> int:
        """Position of global ``rank`` inside its SP group (which 1/sp of the row it keeps)."""
        self._check_rank(rank)
        return rank % self.sp

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")

    def validate_model(self, n_heads: int, n_kv_heads: int, attention_backend: str = "auto",
                       device_type: str = "cuda") -> int:
        """Check the model fits this layout (before any GPU work); returns the KV replication factor."""
        rep = kv_replication_factor(n_heads, n_kv_heads, self.sp)
        if self.sp > 1:
            check_sp_attention_backend(attention_backend, device_type, self.sp)
        return rep

    def build_mesh(self, device_type: str) -> ParallelMeshes:
        """Create the device meshes (collective: every rank must call it, after init_process_group)."""
        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs torch.distributed to be initialised (torchrun / init_process_group)")
        if dist.get_world_size() != self.world_size:
            raise ParallelConfigError(
                f"ParallelDims.world_size={self.world_size} but the process group has {dist.get_world_size()} ranks"
            )
        mesh = init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))
        # One flat dimension over dp × sp for FSDP (same ranks as the 2-D mesh, row-major).
        fsdp = mesh["dp", "sp"]._flatten("dp_sp")
        ep_mesh = None
        if self.ep > 1:
            ep_mesh = init_device_mesh(device_type, (self.world_size // self.ep, self.ep), mesh_dim_names=("edp", "ep"))
        return ParallelMeshes(dims=self, mesh=mesh, fsdp=fsdp, ep_mesh=ep_mesh)


@dataclass
class ParallelMeshes:
    """The meshes one rank uses. ``mesh`` is 2-D ("dp", "sp"); ``fsdp`` is its flattening ("dp_sp")."""

    dims: ParallelDims
    mesh: DeviceMesh
    fsdp: DeviceMesh
    ep_mesh: DeviceMesh | None = None

    @property
    def sp_mesh(self) -> DeviceMesh:
        return self.mesh["sp"]

    @property
    def sp_group(self) -> dist.ProcessGroup:
        """Process group of this rank's SP group (pass to ``apply_ulysses``)."""
        return self.mesh.get_group("sp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks holding the same sequence shard of different rows (same sp_rank)."""
        return self.mesh.get_group("dp")

    @property
    def fsdp_group(self) -> dist.ProcessGroup:
        """All ranks that share gradients of the dense parameters (dp × sp); token counts reduce over it too."""
        return self.fsdp.get_group()

    @property
    def dp_rank(self) -> int:
        """Data-loader rank (same for every rank of an SP group)."""
        return self.mesh.get_local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def sp_rank(self) -> int:
        return self.mesh.get_local_rank("sp")

    @property
    def sp_size(self) -> int:
        return self.dims.sp
