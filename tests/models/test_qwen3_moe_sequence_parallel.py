"""Qwen3-MoE under Ulysses SP=2 on CPU (gloo, 2 processes, fp32): the loss, the router (load-balancing and z)
losses, the expert-load metrics and every gradient equal the single-process SP=1 run, with the experts whole on
each rank (EP=1) and split over the same two ranks (SP=2 x EP=2).

The router losses need the statistics of the whole row, but each SP rank routes only its half. The model's
``moe_aux_loss(group)`` (mirotrain/modules/moe/losses.py) all-reduces the detached per-expert counts and the
token count over ``group`` (the trainer passes dp x sp) and returns this rank's share, built from its own
probability sums; the shares add up to the SP=1 value and so do their gradients, once FSDP has reduced them.
The padding that makes the row a multiple of sp carries ``token_mask`` False and stays out of the statistics.
Each rank backpropagates ``world x (CE sum / N + aux share)``, as the trainer's step does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gloo_ranks import run_on_gloo_ranks

from mirotrain.models.qwen3_moe import qwen3_moe
from mirotrain.models.qwen3_moe.parallelize import parallelize_qwen3_moe
from mirotrain.parallel.mesh import ParallelDims
from mirotrain.parallel.options import ParallelizeOptions
from mirotrain.parallel.ulysses import IGNORE_INDEX, UlyssesAttention, shard_batch_for_sp

WORLD = 2
ARGS = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
            num_experts=8, num_experts_per_tok=2, moe_hidden_dim=16, router_aux_loss_coef=0.05,
            router_z_loss_coef=0.01, max_seq_len=256, attention_backend="sdpa")
CU_SEQLENS = [0, 9, 23, 37]  # documents cross the shard boundary; 37 tokens: one padding token under SP=2
TOL = 1e-5


def packed_row() -> dict:
    """One packed row (position ids restart per document, the first 2 labels of each document ignored)."""
    gen = torch.Generator().manual_seed(3)
    total = CU_SEQLENS[-1]
    labels = torch.randint(0, ARGS["vocab_size"], (1, total), generator=gen)
    for start in CU_SEQLENS[:-1]:
        labels[0, start:start + 2] = IGNORE_INDEX
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    return dict(input_ids=torch.randint(1, ARGS["vocab_size"], (1, total), generator=gen), labels=labels,
                position_ids=torch.cat([torch.arange(b - a) for a, b in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:])])[None],
                token_mask=torch.ones(1, total, dtype=torch.bool), cu_seqlens=cu,
                max_seqlen=int((cu[1:] - cu[:-1]).max()))


def ce_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"],
                   token_mask=batch["token_mask"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def reference() -> tuple[torch.nn.Module, float]:
    """SP=1 in this process: (CE sum / N + router loss).backward() over the whole row."""
    model = qwen3_moe(**ARGS)
    model.init_weights(seed=0)
    row = packed_row()
    loss = ce_sum(model, row) / (row["labels"] != IGNORE_INDEX).sum() + model.moe_aux_loss()
    loss.backward()
    return model, loss.item()


def sp_run(ref: torch.nn.Module, ref_loss: float, ep: int) -> None:
    label = f"SP=2 EP={ep}"
    meshes = ParallelDims(WORLD, sp=2, ep=ep).build_mesh("cpu")
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    parallelize_qwen3_moe(model, meshes, ParallelizeOptions(device_type="cpu", ac_mode="full",
                                                            param_dtype=torch.float32))
    assert sum(isinstance(getattr(m, "attn_fn", None), UlyssesAttention) for m in model.modules()) == 2
    if ep == 2:
        assert model.layers[0].feed_forward.experts.w1.to_local().shape[0] == ARGS["num_experts"] // 2
    row = packed_row()
    local = shard_batch_for_sp(row, meshes.sp_rank, meshes.sp_size, pad_id=0)
    n_global = (row["labels"] != IGNORE_INDEX).sum()
    group = meshes.fsdp_group  # the trainer's loss group: dp x sp
    share = ce_sum(model, local) / n_global + model.moe_aux_loss(group)
    (share * WORLD).backward()  # FSDP divides the reduced gradients by the world size

    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    assert abs(total.item() - ref_loss) <= TOL, (label, total.item(), ref_loss)
    ref_stats, stats = ref.expert_load_stats(), model.expert_load_stats(group)
    assert stats.keys() == ref_stats.keys()
    for key in stats:
        assert abs(stats[key] - ref_stats[key]) <= TOL, (label, key, stats[key], ref_stats[key])
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name.replace("_checkpoint_wrapped_module.", "")].grad
        assert expected.abs().max() > 0, name  # every parameter, router and experts included, gets gradient
        err = (p.grad.full_tensor() - expected).abs().max().item()
        assert err <= TOL, f"{label}: grad of {name} differs by {err}"


def worker(rank: int, world: int) -> None:
    ref, ref_loss = reference()
    for ep in (1, 2):
        sp_run(ref, ref_loss, ep)


@pytest.mark.slow  # 2 processes in one gloo group
def test_moe_sp2_equals_sp1_with_and_without_expert_parallel(tmp_path):
    run_on_gloo_ranks(worker, WORLD, tmp_path)
