"""Ulysses SP on CPU (gloo, fp32): SP=2/4 losses and gradients equal the single-process run within 1e-5.

Every worker builds the same tiny Qwen3 twice: once plain (the SP=1 reference over every row of the step,
computed locally) and once parallelised as the trainer does it (``parallelize_qwen3``: SP -> AC -> FSDP over
the dp × sp mesh, which averages the gradients over the world). Packed rows have documents that cross shard
boundaries and lengths that are not multiples of sp (so the padding segment is exercised). Each rank
backpropagates ``loss_sum · world / N`` with N the trained tokens over all ranks, as the trainer's step does.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gloo_ranks import run_on_gloo_ranks

from mirotrain.models.qwen3 import qwen3
from mirotrain.models.qwen3.parallelize import parallelize_qwen3
from mirotrain.parallel.mesh import ParallelConfigError, ParallelDims, ParallelMeshes
from mirotrain.parallel.options import ParallelizeOptions
from mirotrain.parallel.ulysses import IGNORE_INDEX, UlyssesAttention, apply_ulysses, shard_batch_for_sp, sp_all_reduce_sum

VOCAB, DIM, HEAD_DIM, HIDDEN = 96, 32, 8, 48
TOL = 1e-5


def make_row(cu: list[int], seed: int) -> dict:
    """A packed row: random tokens/targets, position ids restarting per document, first 2 labels of each
    document ignored (like a masked prompt)."""
    gen = torch.Generator().manual_seed(seed)
    total = cu[-1]
    input_ids = torch.randint(1, VOCAB, (1, total), generator=gen)
    labels = torch.randint(0, VOCAB, (1, total), generator=gen)
    position_ids = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])[None]
    for start in cu[:-1]:
        labels[0, start:start + 2] = IGNORE_INDEX
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return dict(input_ids=input_ids, labels=labels, position_ids=position_ids, cu_seqlens=cu_t,
                max_seqlen=int((cu_t[1:] - cu_t[:-1]).max()))


def build_model(case: dict) -> torch.nn.Module:
    extra = {}
    if case.get("yarn"):  # small original context so yarn really changes the frequencies at these lengths
        extra = dict(max_seq_len=64, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 16})
    model = qwen3(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=case["heads"], n_kv_heads=case["kv"],
                  head_dim=HEAD_DIM, hidden_dim=HIDDEN, attention_backend="sdpa", **extra)
    model.init_weights(seed=case["seed"])
    return model


def forward_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["position_ids"], batch.get("cu_seqlens"), batch.get("max_seqlen"))
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def parallelize(model: torch.nn.Module, meshes: ParallelMeshes, case: dict) -> torch.nn.Module:
    """The trainer's path: SP -> AC (when the case asks for it) -> FSDP, fp32 on CPU."""
    options = ParallelizeOptions(device_type="cpu", ac_mode="full" if case.get("ac") else "none",
                                 param_dtype=torch.float32)
    parallelize_qwen3(model, meshes, options)
    assert sum(isinstance(getattr(m, "attn_fn", None), UlyssesAttention) for m in model.modules()) == 2
    return model


def check_grads(model: torch.nn.Module, ref: torch.nn.Module, label: str) -> None:
    """FSDP's reduced gradients (the mean over dp × sp) equal the reference's."""
    ref_grads = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        ref_grad = ref_grads[name.replace("_checkpoint_wrapped_module.", "")].grad
        worst = max(worst, (p.grad.full_tensor() - ref_grad).abs().max().item())
        assert ref_grad.abs().max() > 0, name
    assert worst <= TOL, (label, worst)


def run_case(case: dict, rank: int, world: int) -> None:
    dims = ParallelDims(world, dp=case["dp"], sp=case["sp"])
    meshes = dims.build_mesh("cpu")
    rows = [make_row(cu, seed=100 * case["seed"] + i) for i, cu in enumerate(case["rows"])]
    assert len(rows) == dims.dp_size and meshes.dp_rank == dims.dp_rank(rank)

    # SP=1 reference: one process, every row of the step, loss = Σ token losses / N.
    ref = build_model(case)
    ref_sum = sum(forward_loss_sum(ref, row) for row in rows)
    n_ref = sum(int((row["labels"] != IGNORE_INDEX).sum()) for row in rows)
    (ref_sum / n_ref).backward()
    ref_loss = (ref_sum / n_ref).item()

    model = parallelize(build_model(case), meshes, case)
    local = shard_batch_for_sp(rows[meshes.dp_rank], meshes.sp_rank, dims.sp, pad_id=0)
    loss_sum = forward_loss_sum(model, local)
    n_global = (local["labels"] != IGNORE_INDEX).sum().double()
    dist.all_reduce(n_global, group=meshes.fsdp_group)
    assert int(n_global) == n_ref
    (loss_sum * (world / n_global)).backward()
    logged = loss_sum.detach().double()
    dist.all_reduce(logged, group=meshes.fsdp_group)
    assert abs(logged.item() / n_ref - ref_loss) <= TOL, (case["name"], logged.item() / n_ref, ref_loss)
    check_grads(model, ref, case["name"])


def doc_logprob_sums(model: torch.nn.Module, batch: dict, offset: int) -> torch.Tensor:
    """Σ log p(label) per document of the (global) cu_seqlens over this shard's tokens (DPO's quantity)."""
    logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"])
    logp = -F.cross_entropy(logits[0].float(), batch["labels"][0], ignore_index=IGNORE_INDEX, reduction="none")
    cu = batch["cu_seqlens"].long()
    pos = torch.arange(offset, offset + logp.shape[0])
    seg = torch.searchsorted(cu, pos, right=True) - 1
    return torch.zeros(cu.numel() - 1).index_add(0, seg, logp)


def sequence_loss(sums: torch.Tensor, n_docs: int) -> torch.Tensor:
    """A nonlinear function of the per-document totals (so using the *summed* value matters)."""
    weights = torch.linspace(-1.0, 1.0, n_docs)
    return (weights * torch.tanh(sums[:n_docs] / 20.0)).sum() + F.logsigmoid(sums[0] - sums[n_docs - 1])


def run_sequence_case(case: dict, rank: int, world: int) -> None:
    """Sequence-level loss (DPO-like): per-document log-prob sums reduced with sp_all_reduce_sum; the loss
    is the mean over DP replicas, gradients averaged over the world by FSDP2."""
    dims = ParallelDims(world, dp=case["dp"], sp=case["sp"])
    meshes = dims.build_mesh("cpu")
    rows = [make_row(cu, seed=100 * case["seed"] + i) for i, cu in enumerate(case["rows"])]
    ref = build_model(case)
    ref_loss = sum(sequence_loss(doc_logprob_sums(ref, row, 0), len(row["cu_seqlens"]) - 1) for row in rows) / len(rows)
    ref_loss.backward()

    model = parallelize(build_model(case), meshes, case)
    row = rows[meshes.dp_rank]
    local = shard_batch_for_sp(row, meshes.sp_rank, dims.sp, pad_id=0)
    offset = meshes.sp_rank * local["input_ids"].shape[1]
    sums = sp_all_reduce_sum(doc_logprob_sums(model, local, offset), meshes.sp_group)
    loss = sequence_loss(sums, len(row["cu_seqlens"]) - 1)
    (loss * world / dims.dp_size).backward()
    logged = loss.detach().clone()
    dist.all_reduce(logged, group=meshes.fsdp_group)
    assert abs(logged.item() / world - ref_loss.item()) <= TOL, (case["name"], logged.item() / world, ref_loss.item())
    check_grads(model, ref, f"{case['name']} sequence loss")


def check_errors(rank: int, world: int) -> None:
    """apply_ulysses refuses a model whose heads the SP group cannot split (on every rank, before work)."""
    group = dist.new_group(list(range(world)))
    with pytest.raises(ParallelConfigError, match="must divide the number of attention heads"):
        apply_ulysses(build_model(dict(heads=3 * world // 2, kv=world // 2, seed=0)), group)
    varlen = qwen3(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=HEAD_DIM,
                   hidden_dim=HIDDEN, attention_backend="varlen")
    with pytest.raises(ParallelConfigError, match="not available on cpu"):
        apply_ulysses(varlen, group)
    model = build_model(dict(heads=4, kv=2, seed=0))
    apply_ulysses(model, group)
    with pytest.raises(ParallelConfigError, match="already applied"):
        apply_ulysses(model, group)


def check_meshes(rank: int, world: int) -> None:
    """build_mesh: SP groups are contiguous ranks, dp groups stride by sp, FSDP spans everyone, EP mesh."""
    dims = ParallelDims(world, sp=2, ep=2)
    meshes = dims.build_mesh("cpu")
    first = rank - rank % 2
    assert dist.get_process_group_ranks(meshes.sp_group) == [first, first + 1]
    assert dist.get_process_group_ranks(meshes.dp_group) == list(range(rank % 2, world, 2))
    assert dist.get_process_group_ranks(meshes.fsdp_group) == list(range(world))
    assert (meshes.dp_rank, meshes.sp_rank) == (dims.dp_rank(rank), dims.sp_rank(rank))
    assert (meshes.dp_size, meshes.sp_size) == (world // 2, 2)
    assert meshes.ep_mesh is not None and meshes.ep_mesh["ep"].size() == 2
    with pytest.raises(ParallelConfigError, match="process group has"):
        ParallelDims(2 * world, sp=2).build_mesh("cpu")


def worker(rank: int, world: int, cases: list[dict]) -> None:
    for case in cases:
        run_case(case, rank, world)
        if case.get("sequence_loss"):
            run_sequence_case(case, rank, world)
    check_errors(rank, world)
    check_meshes(rank, world)


# Documents straddle every shard boundary; totals are not multiples of sp (padding segment is used).
CASES_2 = [
    dict(name="sp2_kv2_yarn_ac", sp=2, dp=1, heads=4, kv=2, seed=1, yarn=True, ac=True, rows=[[0, 9, 23, 35]],
         sequence_loss=True),
    dict(name="sp2_kv4", sp=2, dp=1, heads=8, kv=4, seed=2, rows=[[0, 17, 19, 40]]),
]
CASES_4 = [
    dict(name="sp4_kv4", sp=4, dp=1, heads=8, kv=4, seed=3, rows=[[0, 5, 18, 30, 37]]),
    dict(name="sp4_kv2_replicated", sp=4, dp=1, heads=8, kv=2, seed=4, yarn=True, rows=[[0, 13, 27, 42]],
         sequence_loss=True),
    dict(name="sp4_h4_kv2_replicated", sp=4, dp=1, heads=4, kv=2, seed=5, rows=[[0, 21, 33]]),
    dict(name="dp2_sp2", sp=2, dp=2, heads=4, kv=2, seed=6, ac=True, rows=[[0, 11, 25, 31], [0, 7, 8, 29]],
         sequence_loss=True),
]


@pytest.mark.slow  # 2 processes in one gloo group
def test_sp2_matches_single_process(tmp_path):
    run_on_gloo_ranks(worker, 2, tmp_path, CASES_2)


@pytest.mark.slow  # 4 processes in one gloo group
def test_sp4_and_dp2_sp2_match_single_process(tmp_path):
    run_on_gloo_ranks(worker, 4, tmp_path, CASES_4)


# ------------------------------------------------------------------------------------ single process
def test_shard_batch_pads_with_an_ignored_segment_and_slices_columns():
    row = make_row([0, 4, 11], seed=0)
    shards = [shard_batch_for_sp(row, r, 4, pad_id=7) for r in range(4)]
    for s in shards:
        assert s["input_ids"].shape == (1, 3) and s["labels"].shape == (1, 3) and s["position_ids"].shape == (1, 3)
        assert s["cu_seqlens"].tolist() == [0, 4, 11, 12] and s["cu_seqlens"].dtype == torch.int32
        assert s["max_seqlen"] == 7
    full = {k: torch.cat([s[k] for s in shards], dim=1) for k in ("input_ids", "labels", "position_ids")}
    assert torch.equal(full["input_ids"][:, :11], row["input_ids"]) and full["input_ids"][0, 11] == 7
    assert torch.equal(full["labels"][:, :11], row["labels"]) and full["labels"][0, 11] == IGNORE_INDEX
    assert full["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0]
    assert row["cu_seqlens"].tolist() == [0, 4, 11]  # input untouched


def test_shard_batch_slices_the_token_mask_and_masks_its_padding():
    row = make_row([0, 4, 11], seed=0)
    row["token_mask"] = torch.ones(1, 11, dtype=torch.bool)
    row["token_mask"][0, 9:] = False  # the row's own padding segment
    shards = [shard_batch_for_sp(row, r, 4, pad_id=7) for r in range(4)]
    assert all(s["token_mask"].shape == (1, 3) for s in shards)
    assert torch.cat([s["token_mask"] for s in shards], dim=1).tolist() == [[True] * 9 + [False] * 3]


def test_shard_batch_aligned_row_is_only_sliced():
    row = make_row([0, 3, 8], seed=1)
    shard = shard_batch_for_sp(row, 1, 2, pad_id=0)
    assert shard["cu_seqlens"] is row["cu_seqlens"] and shard["max_seqlen"] == row["max_seqlen"]
    assert torch.equal(shard["input_ids"], row["input_ids"][:, 4:])


def test_shard_batch_tail_after_last_document_becomes_its_own_segment():
    row = make_row([0, 3, 8], seed=2)
    row["cu_seqlens"] = row["cu_seqlens"][:2]  # cu_seqlens covers only the first 3 tokens
    shard = shard_batch_for_sp(row, 0, 3, pad_id=0)
    assert shard["cu_seqlens"].tolist() == [0, 3, 8, 9] and shard["max_seqlen"] == 5


def test_shard_batch_unpacked_rows_and_missing_position_ids():
    batch = dict(input_ids=torch.arange(10).view(2, 5), labels=torch.arange(10).view(2, 5))
    shards = [shard_batch_for_sp(batch, r, 2, pad_id=0) for r in range(2)]
    assert "cu_seqlens" not in shards[0]
    assert shards[1]["position_ids"].tolist() == [[3, 4, 5], [3, 4, 5]]
    assert shards[1]["labels"][:, -1].tolist() == [IGNORE_INDEX, IGNORE_INDEX]


def test_shard_batch_rejects_bad_input():
    row = make_row([0, 3, 8], seed=3)
    with pytest.raises(ValueError, match="sp_rank"):
        shard_batch_for_sp(row, 2, 2, pad_id=0)
    row["cu_seqlens"] = torch.tensor([0, 3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens ends at 9"):
        shard_batch_for_sp(row, 0, 2, pad_id=0)
