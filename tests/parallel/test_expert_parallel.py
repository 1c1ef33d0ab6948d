"""Expert parallelism on CPU (gloo, fp32), through the family's parallelize (SP -> EP -> AC -> compile -> FSDP)
that the trainer runs: EP=2 equals EP=1 and the unsharded model in logits, losses and gradients.

Global objective (what data-parallel training minimises), for the W rows of all ranks together:
    J = sum of token CE / global token count + coef * aux(global router statistics) (+ z)
The single-process reference evaluates J on the stacked batch (B = W). Each rank r of the parallel run sees
only row r and minimises W * share_r (share_r = its CE sum / global count + its aux share); FSDP2 averages
the gradients over the W ranks (the experts in their own unit over "edp", divided by W as well), which
must reproduce grad J, expert rows included.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mirotrain.models.qwen3_moe import qwen3_moe
from mirotrain.models.qwen3_moe.parallelize import parallelize_qwen3_moe
from mirotrain.parallel.expert_parallel import check_expert_parallel
from mirotrain.parallel.mesh import ParallelDims
from mirotrain.parallel.options import ParallelizeOptions
from mirotrain.training.grad_clip import global_grad_norm

from gloo_ranks import run_on_gloo_ranks

WORLD = 2
ARGS = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
            num_experts=8, num_experts_per_tok=2, moe_hidden_dim=16, mlp_only_layers=[],
            router_aux_loss_coef=0.05, router_z_loss_coef=0.01, max_seq_len=256)
TOL = 1e-5


def _parallelize(model, world: int, ep: int, ac_mode: str = "none"):
    """The trainer's path: meshes from ParallelDims, then the family's parallelize (fp32 on CPU)."""
    meshes = ParallelDims(world, ep=ep).build_mesh("cpu")
    return parallelize_qwen3_moe(model, meshes, ParallelizeOptions(device_type="cpu", ac_mode=ac_mode,
                                                                   param_dtype=torch.float32))


def _batch(seq: int = 24, rows: int = WORLD):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ARGS["vocab_size"], (rows, seq), generator=gen)
    labels = torch.randint(0, ARGS["vocab_size"], (rows, seq), generator=gen)
    labels[0, :5] = -100  # unequal trained-token counts per rank
    return ids, labels


def _reference(rows: int = WORLD):
    torch.manual_seed(0)
    model = qwen3_moe(**ARGS)
    model.init_weights(seed=0)
    ids, labels = _batch(rows=rows)
    logits = model(ids)
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / n
    loss = loss + model.moe_aux_loss()
    loss.backward()
    return model, logits.detach(), loss.detach()


def _rank_loss(model, rank: int, group, rows: int = WORLD) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = _batch(rows=rows)
    n_global = (labels != -100).sum()  # the trainer all-reduces this count; every rank has it here
    logits = model(ids[rank:rank + 1])
    ce = F.cross_entropy(logits.flatten(0, 1), labels[rank].flatten(), ignore_index=-100, reduction="sum")
    share = ce / n_global + model.moe_aux_loss(group)
    return logits.detach(), share


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_grads(model, ref, rank: int, label: str) -> None:
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_grads[name.replace("_checkpoint_wrapped_module.", "")].grad
        got = _full(p.grad)
        assert got.shape == expected.shape, (label, name)
        err = (got - expected).abs().max().item()
        assert err <= TOL, f"{label}: grad of {name} differs by {err}"


def _worker(rank: int, world_size: int) -> None:
    ref, ref_logits, ref_loss = _reference()
    world = dist.group.WORLD
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))

    # EP=1 (experts sharded by FSDP like every weight) and EP=2 (experts split over "ep", with full AC)
    for ep, ac_mode in ((1, "none"), (2, "full")):
        label = f"EP={ep} AC={ac_mode}"
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        _parallelize(model, WORLD, ep, ac_mode)
        if ep == 2:
            assert model.layers[0].feed_forward.experts.w1.to_local().shape[0] == ARGS["num_experts"] // 2
        logits, share = _rank_loss(model, rank, world)
        assert (logits[0] - ref_logits[rank]).abs().max().item() <= TOL, label
        (WORLD * share).backward()
        total = share.detach().clone()
        dist.all_reduce(total)
        assert abs(total.item() - ref_loss.item()) <= TOL, (label, total.item(), ref_loss.item())
        _check_grads(model, ref, rank, label)
        # the trainer's global norm over the dense and expert meshes = the unsharded norm
        assert abs(global_grad_norm([p.grad for p in model.parameters()]).item() - ref_norm.item()) <= 1e-5
        stats = model.expert_load_stats(world)
        ref_stats = ref.expert_load_stats()
        for key in ("moe/aux_loss", "moe/z_loss", "moe/layer_0/max_load"):
            assert abs(stats[key] - ref_stats[key]) <= 1e-5, (label, key, stats[key], ref_stats[key])


def _sharded_load_worker(rank: int, world: int, hf_dir: str) -> None:
    """World 4 = edp 2 x ep 2: meta model -> parallelize (EP, FSDP2) -> load HF weights (own rows only) -> grads."""
    from torch.distributed.tensor.experimental import implicit_replication

    from mirotrain.models import load_hf_weights

    ref, _, _ = _reference(rows=world)
    with torch.device("meta"):
        model = qwen3_moe(**ARGS)
    _parallelize(model, world, ep=2)  # edp 2: the experts' gradients are reduced over 2 ranks
    model.to_empty(device="cpu")
    model.rope.reset_parameters()
    w1 = model.layers[1].feed_forward.experts.w1
    assert w1.to_local().shape[0] == ARGS["num_experts"] // world  # 8 experts over 4 ranks
    load_hf_weights(model, hf_dir)
    expected = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), expected[name].detach()), name
    logits, share = _rank_loss(model, rank, dist.group.WORLD, rows=world)
    (world * share).backward()
    _check_grads(model, ref, rank, "edp2 x ep2 + FSDP2")
    with implicit_replication():  # random init of a sharded model equals the unsharded init
        model.init_weights(seed=0)
    fresh = qwen3_moe(**ARGS)
    fresh.init_weights(seed=0)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.full_tensor(), q.detach()), name


@pytest.mark.slow  # 2 processes in one gloo group
def test_ep2_equals_ep1_gloo(tmp_path):
    run_on_gloo_ranks(_worker, WORLD, tmp_path)


@pytest.mark.slow  # 4 processes in one gloo group
def test_ep_fsdp_sharded_hf_load_4_ranks(tmp_path):
    from mirotrain.models import save_pretrained

    ref, _, _ = _reference(rows=4)
    save_pretrained(ref, tmp_path / "hf", dtype=torch.float32, max_shard_size=50_000)
    run_on_gloo_ranks(_sharded_load_worker, 4, tmp_path, str(tmp_path / "hf"))


def test_ep_divisibility_errors():
    with pytest.raises(ValueError, match="must divide num_experts=128"):
        check_expert_parallel(num_experts=128, world_size=12, ep=3)
    with pytest.raises(ValueError, match=r"must divide the number of data-parallel ranks \(6\)"):
        check_expert_parallel(num_experts=128, world_size=6, ep=4)
    with pytest.raises(ValueError, match=">= 1"):
        check_expert_parallel(num_experts=128, world_size=8, ep=0)
    check_expert_parallel(num_experts=128, world_size=8, ep=4)
