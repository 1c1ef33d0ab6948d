"""ParallelDims: layout arithmetic and the up-front errors (no process group needed).

Mesh construction itself (build_mesh: group membership, data-loader ranks) runs inside the gloo workers of
test_ulysses.py.
"""

from __future__ import annotations

import pytest

from mirotrain.parallel.mesh import ParallelConfigError, ParallelDims, check_sp_attention_backend, kv_replication_factor


def test_dp_inferred_and_loader_ranks_shared_by_an_sp_group():
    dims = ParallelDims(world_size=8, sp=4)
    assert (dims.dp, dims.dp_size, dims.sp_enabled) == (2, 2, True)
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [dims.sp_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert ParallelDims(world_size=4).dp_size == 4
    with pytest.raises(ValueError, match="outside world"):
        dims.dp_rank(8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, sp=4), "must divide the world size"),
    (dict(world_size=8, dp=4, sp=4), r"dp \(4\) × sp \(4\) must equal the world size \(8\)"),
    (dict(world_size=8, ep=3), "ep=3 must divide the world size"),
    (dict(world_size=8, sp=0), "sp and ep must be >= 1"),
    (dict(world_size=0), "world_size must be >= 1"),
])
def test_layout_errors(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        ParallelDims(**kwargs)


@pytest.mark.parametrize("heads, kv, sp, rep", [
    (32, 8, 1, 1), (32, 8, 4, 1), (32, 8, 8, 1),  # Qwen3-8B: KV heads exchanged as they are
    (32, 8, 16, 2), (64, 4, 8, 2), (8, 2, 4, 2), (4, 1, 4, 4),  # sp > KV: minimal replication sp/KV
])
def test_kv_replication_factor(heads, kv, sp, rep):
    assert kv_replication_factor(heads, kv, sp) == rep


@pytest.mark.parametrize("heads, kv, sp, message", [
    (40, 8, 16, "must divide the number of attention heads \\(40\\)"),  # Qwen3-14B with sp=16
    (12, 6, 4, "must divide the number of KV heads \\(6\\)"),
    (12, 3, 4, "exceeds the number of KV heads \\(3\\) and must then be a multiple"),
    (8, 3, 1, "must be a multiple of n_kv_heads"),
])
def test_head_errors(heads, kv, sp, message):
    with pytest.raises(ParallelConfigError, match=message):
        kv_replication_factor(heads, kv, sp)


def test_validate_model_checks_heads_and_backend():
    dims = ParallelDims(world_size=8, sp=4)
    assert dims.validate_model(32, 8, "sdpa", device_type="cpu") == 1
    assert dims.validate_model(8, 2, "auto", device_type="cpu") == 2
    with pytest.raises(ParallelConfigError, match="needs a varlen attention backend"):
        dims.validate_model(32, 8, "sdpa", device_type="cuda")
    with pytest.raises(ParallelConfigError, match="not available on cpu"):
        dims.validate_model(32, 8, "flash", device_type="cpu")
    with pytest.raises(ParallelConfigError, match="must be one of"):
        dims.validate_model(32, 8, "flex", device_type="cpu")
    # Without SP any available backend is fine, dense-mask sdpa on CUDA included.
    assert ParallelDims(world_size=8).validate_model(32, 8, "sdpa", device_type="cuda") == 1


def test_check_sp_attention_backend_resolves_auto_on_cpu():
    assert check_sp_attention_backend("auto", "cpu", sp=2) == "sdpa"
