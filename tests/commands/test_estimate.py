"""validate's memory estimate responds to what the run holds: the DPO row and live reference, the state's
bytes per parameter, CPU offload and sequence parallelism (mirotrain/commands/estimate.py, step_memory.py).
Its agreement with measured peaks: test_estimate_calibration.py."""

from pathlib import Path

import pytest
import torch

from mirotrain.commands.estimate import (checkpoint_bytes_per_param, estimate_memory, row_tokens,
                                         state_bytes_per_param, step_terms)
from mirotrain.commands.validate import main as validate
from mirotrain.config import instantiate, load_config
from mirotrain.config.tree import TrainConfig

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs"
SFT_8B = CONFIG_ROOT / "qwen3" / "8B_full_sft.yaml"
DPO_8B = CONFIG_ROOT / "qwen3" / "8B_full_dpo.yaml"
WORLD = 8


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate(load_config(str(SFT_8B), [])["model"])


def _cfg(path: Path, *overrides: str, drop_packed_seq_len: bool = False) -> TrainConfig:
    raw = load_config(str(path), list(overrides))
    if drop_packed_seq_len:
        raw["dataset"].pop("packed_seq_len")
    return TrainConfig.from_dict(raw)


def test_dpo_and_sft_share_the_layers_and_differ_in_the_head(model):
    """Same 32K-token row: the same decoder layers, so the same activations in backward. At the loss the SFT
    head (chunked linear CE) computes the LM-head gradient in its forward (fp32 running sum, a chunk's fp32
    logits and gradients), DPO's log-prob head only a chunk of fp32 logits; a live reference adds a bf16 copy
    of the model at every moment."""
    sft = step_terms(model, _cfg(SFT_8B, "dataset.packed=True", "dataset.packed_seq_len=32768"), WORLD)
    dpo = step_terms(model, _cfg(DPO_8B, "dataset.packed_seq_len=32768"), WORLD)
    live = step_terms(model, _cfg(DPO_8B, "dataset.packed_seq_len=32768", "reference=live"), WORLD)
    n_params = sum(p.numel() for p in model.parameters())
    for moment in ("start of the backward", "end of the backward"):
        assert dpo[moment].activations == sft[moment].activations
    assert 0 < dpo["loss in the forward"].loss < sft["loss in the forward"].loss
    assert all(t.reference == 0 for t in dpo.values())
    assert all(live[m].total - dpo[m].total == live[m].reference == 2 * n_params // WORLD for m in dpo)


def test_a_dpo_row_without_packed_seq_len_holds_chosen_and_rejected():
    """MiroTrain's pair layout: each of the two documents up to max_seq_len (8B_full_dpo: 16K)."""
    assert row_tokens(_cfg(DPO_8B, drop_packed_seq_len=True), preference=True) == 2 * 16384
    assert row_tokens(_cfg(SFT_8B), preference=False) == 16384


def test_sequence_parallelism_halves_the_activations_and_adds_all_to_all_buffers(model):
    one = step_terms(model, _cfg(SFT_8B, "ulysses_sequence_parallel_size=1"), WORLD)
    two = step_terms(model, _cfg(SFT_8B, "ulysses_sequence_parallel_size=2"), WORLD)
    for moment in one:
        assert two[moment].activations * 2 == pytest.approx(one[moment].activations, rel=1e-6)
        assert one[moment].all_to_all == 0 < two[moment].all_to_all < two["end of the backward"].activations
        assert two[moment].sharded_state == one[moment].sharded_state
    assert estimate_memory(model, _cfg(SFT_8B, "ulysses_sequence_parallel_size=2"), WORLD).tokens_per_gpu == 8192


def test_cpu_offload_moves_the_state_to_the_host(model):
    """The state and the optimizer leave the GPU; what the step computes with stays."""
    gpu_cfg = _cfg(DPO_8B, "reference=live")
    gpu, host = step_terms(model, gpu_cfg, WORLD), step_terms(model, _cfg(DPO_8B, "reference=live",
                                                                            "fsdp_cpu_offload=True"), WORLD)
    assert all(t.sharded_state == t.reference == 0 for t in host.values())
    assert host["optimizer step"].total == 0
    for moment in ("loss in the forward", "start of the backward", "end of the backward"):
        assert host[moment].total == gpu[moment].total - gpu[moment].sharded_state - gpu[moment].reference
    on_host = estimate_memory(model, _cfg(DPO_8B, "reference=live", "fsdp_cpu_offload=True"), WORLD)
    step = gpu["optimizer step"]
    assert on_host.host_state_per_rank == step.sharded_state + step.reference


@pytest.mark.parametrize("mode, state, checkpoint", [("fp32", 16, 12), ("bf16", 10, 8), ("bf16_plain", 8, 6)])
def test_state_bytes_per_param_sets_the_sharded_state(model, mode, state, checkpoint):
    """fp32 masters + fp32 AdamW; bf16 weights, gradients, moments + compensation; bf16 without it. The
    trainer's measured figures: tests/training/test_master_weights.py. The whole state is there at the
    optimizer step; in the forward the gradients (4 or 2 bytes) are not yet."""
    cfg = _cfg(SFT_8B, f"master_weights={mode}")
    assert (state_bytes_per_param(cfg), checkpoint_bytes_per_param(cfg)) == (state, checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    terms = step_terms(model, cfg, WORLD)
    assert terms["optimizer step"].sharded_state == state * n_params // WORLD
    assert terms["loss in the forward"].sharded_state == (state - (4 if mode == "fp32" else 2)) * n_params // WORLD


def test_the_compensated_adamw_step_counts_its_largest_flat_chunk(model):
    """master_weights: bf16 eager (``compile``'s optimizer_step off) updates the embedding's and the LM head's
    shards alone in fp32 buffers, 48 bytes per element (mirotrain/optim/bf16_adamw.py); compiled (the config's
    ``compile: True``) its kernel updates every shard in place, as fused torch AdamW allocates nothing beyond
    its state. The bytes per element are measured in tests/optim/test_optimizer_transient.py."""
    local_head = 151936 * 4096 // WORLD
    eager = _cfg(SFT_8B, "master_weights=bf16", "compile={model: true, loss: true, optimizer_step: false}")
    assert step_terms(model, eager, WORLD)["optimizer step"].buffers == 48 * local_head
    assert step_terms(model, _cfg(SFT_8B, "master_weights=bf16"), WORLD)["optimizer step"].buffers == 0
    assert step_terms(model, _cfg(SFT_8B), WORLD)["optimizer step"].buffers == 0


def test_validate_prints_the_breakdown(capsys):
    args = ["--config", str(DPO_8B), "--world-size", "8", "--no-file-check", "ulysses_sequence_parallel_size=2",
            "reference=live", "fsdp_cpu_offload=True"]
    assert validate(args) == 0
    out = {line[:12]: line for line in capsys.readouterr().out.splitlines()}
    assert out["tokens/GPU: "] == "tokens/GPU:  16,384 per micro-batch (DPO row of 32,768 tokens: pairs, chosen and " \
                                  "rejected, / SP 2)"
    assert out["memory/GPU: "] == ("memory/GPU:  ~13.7 GiB at the start of the backward (sharded state 0.0, gathered "
                                   "params 3.0, activations 7.8, loss 0.0, SP all-to-all 0.6, grad/reduce buffers 2.2)")
    assert out["state:      "].startswith("state:       16 bytes/param, master_weights: fp32 (fp32 master weights, "
                                          "gradients, AdamW moments), sharded over 8 ranks, on the host "
                                          "(fsdp_cpu_offload): ~")
    assert out["state:      "].endswith(" GiB of host memory per node of 8 GPUs")
    assert out["notice:     "].startswith("notice:      dtype: bf16 computes in bf16 and keeps fp32 master weights")
    assert "master_weights: bf16 keeps bf16 ones with compensated updates (10 bytes/param)" in out["notice:     "]


def test_validate_prints_the_bf16_mode_and_its_bytes(capsys):
    """A chosen mode is printed with its bytes per parameter, and the notice about dtype: bf16 is not."""
    assert validate(["--config", str(SFT_8B), "--world-size", "8", "--no-file-check", "master_weights=bf16"]) == 0
    out = {line[:12]: line for line in capsys.readouterr().out.splitlines()}
    assert out["state:      "] == ("state:       10 bytes/param, master_weights: bf16 (bf16 weights, gradients, AdamW "
                                   "moments and update compensation), sharded over 8 ranks, on the GPU")
    assert "notice:     " not in out
    assert out["checkpoints:"].startswith("checkpoints: ~61 GiB each on disk")  # 8 bytes/param: weight + AdamW state


def test_bf16_modes_need_bf16_compute_and_the_bf16_mode_needs_adamw(capsys):
    tiny = str(CONFIG_ROOT / "tiny" / "sft.yaml")
    assert validate(["--config", tiny, "--no-file-check", "master_weights=bf16_plain"]) == 2
    assert "config key 'master_weights': bf16_plain keeps bf16 weights and needs dtype: bf16, got dtype: fp32" in \
        capsys.readouterr().err
    assert validate(["--config", tiny, "--no-file-check", "dtype=bf16", "master_weights=bf16",
                     "optimizer._component_=torch.optim.SGD"]) == 2
    assert "config key 'optimizer._component_': master_weights: bf16 runs a compensated AdamW and needs " \
        "torch.optim.AdamW, got 'torch.optim.SGD'" in capsys.readouterr().err
    assert validate(["--config", tiny, "--no-file-check", "dtype=bf16", "master_weights=bf16",
                     "optimizer.amsgrad=True"]) == 2
    assert "config key 'optimizer.amsgrad': not supported with master_weights: bf16 (its AdamW takes lr, betas, " \
        "eps, weight_decay)" in capsys.readouterr().err


def test_activation_offloading_moves_the_kept_activations_to_the_host(model):
    """enable_activation_offloading: every layer's kept input (full AC: T·D·c) leaves the GPU for pinned host
    memory; the layer the backward recomputes stays, so the end of the backward does not change."""
    on_gpu = _cfg(SFT_8B, "tokenizer.max_seq_len=40960", "dataset.packed_seq_len=40960")
    offloaded = _cfg(SFT_8B, "tokenizer.max_seq_len=40960", "dataset.packed_seq_len=40960",
                     "enable_activation_offloading=True")
    kept = 40960 * model.args.dim * 2 * model.args.n_layers
    a, b = step_terms(model, on_gpu, WORLD), step_terms(model, offloaded, WORLD)
    assert a["loss in the forward"].activations - b["loss in the forward"].activations == kept
    assert a["start of the backward"].activations - b["start of the backward"].activations == kept * (
        model.args.n_layers - 1) // model.args.n_layers
    assert a["end of the backward"] == b["end of the backward"]
    assert estimate_memory(model, offloaded, WORLD).host_activations_per_rank == kept
    assert estimate_memory(model, on_gpu, WORLD).host_activations_per_rank == 0


def test_unresharded_layers_stay_gathered_and_adam_is_fused_unless_told_otherwise(model):
    """fsdp_reshard_after_forward False keeps every decoder layer gathered from its forward to its backward;
    an Adam(W) node that says neither fused nor foreach runs fused (training/builders.py), so the estimate
    charges no foreach copy of the moments for it."""
    default, kept = _cfg(SFT_8B), _cfg(SFT_8B, "fsdp_reshard_after_forward=False")
    layer = sum(p.numel() for p in model.layers[0].parameters()) * 2
    extra = (model.args.n_layers - 2) * layer
    a, b = step_terms(model, default, WORLD), step_terms(model, kept, WORLD)
    assert b["loss in the forward"].gathered_params - a["loss in the forward"].gathered_params == extra
    unset = step_terms(model, _cfg(SFT_8B, "~optimizer.fused"), WORLD)["optimizer step"]
    foreach = step_terms(model, _cfg(SFT_8B, "~optimizer.fused", "optimizer.foreach=True"), WORLD)["optimizer step"]
    assert unset.buffers == 0 < foreach.buffers


def test_mlp_tiles_shrink_the_running_layer_and_auto_tiles_only_a_short_gpu(model):
    """``mlp_tiles`` k: the recomputed layer keeps no MLP activations and holds one tile's (5·F/k per token)
    and an fp32 input gradient; ``auto`` picks the fewest tiles under 90% of the GPU, 1 where it fits or where
    no GPU size is known (CPU), and leaves per-op selective AC (which keeps matmul outputs) untiled. Where
    tiling cannot lower the peak (the loss's moment), auto does not tile."""
    from mirotrain.commands.estimate import GIB, MemoryPlan, memory_plan

    def mlp_tiles_for(cfg, gpu_bytes):
        return memory_plan(model, cfg, WORLD, gpu_bytes).mlp_tiles

    loss_peak = _cfg(SFT_8B, "ulysses_sequence_parallel_size=1", "dataset.packed_seq_len=40960",
                     "loss_chunk_tokens=8192")
    assert estimate_memory(model, loss_peak, WORLD).phase == "loss in the forward"
    assert mlp_tiles_for(loss_peak, GIB) == 1
    cfg = _cfg(SFT_8B, "ulysses_sequence_parallel_size=1", "dataset.packed_seq_len=40960", "loss_chunk_tokens=1024")
    assert estimate_memory(model, cfg, WORLD).phase == "start of the backward"
    args = model.args
    tokens, c = 40960, 2
    plain = step_terms(model, cfg, WORLD)["start of the backward"]
    tiled = step_terms(model, cfg, WORLD, MemoryPlan("full", None, 4))["start of the backward"]
    mlp_bytes = (6 * args.hidden_dim - (5 * args.hidden_dim // 4 + 2 * args.dim)) * c * tokens
    assert plain.activations - tiled.activations == mlp_bytes
    untiled = estimate_memory(model, cfg, WORLD).total
    assert estimate_memory(model, cfg, WORLD).plan.mlp_tiles == 1  # no GPU size: untiled
    assert mlp_tiles_for(cfg, int(untiled / 0.9) + 1) == 1
    short = estimate_memory(model, cfg, WORLD, gpu_bytes=int(untiled / 0.9) - GIB)
    assert short.plan.mlp_tiles > 1 and short.total <= 0.9 * (untiled / 0.9 - GIB)
    assert mlp_tiles_for(_cfg(SFT_8B, "mlp_tiles=3"), None) == 3
    op = _cfg(SFT_8B, "ac_mode=selective", "ac_option=op", "dataset.packed_seq_len=40960")
    assert mlp_tiles_for(op, GIB) == 1


@pytest.mark.parametrize("value, message", [(0, "must be a positive int or 'auto', got 0"),
                                            ("many", "must be a positive int or 'auto', got 'many'")])
def test_bad_mlp_tiles_are_refused_by_name(value, message, capsys):
    assert validate(["--config", str(SFT_8B), "--no-file-check", f"mlp_tiles={value}"]) == 2
    assert f"config key 'mlp_tiles': {message}" in capsys.readouterr().err


@pytest.mark.parametrize("ac", [["ac_mode=selective", "ac_option=op"], ["ac_mode=selective"]])
def test_mlp_tiles_with_per_op_selective_ac_is_refused(ac, capsys):
    """``op`` (also selective's default) keeps every matmul output, the tiles' among them: refused. Keeping
    only attention outputs, or no AC at all whatever ac_option says, goes with tiles."""
    assert validate(["--config", str(SFT_8B), "--no-file-check", "mlp_tiles=4", *ac]) == 2
    assert "config key 'mlp_tiles': 4 does not go with per-op selective activation checkpointing" in \
        capsys.readouterr().err
    for fine in (["ac_mode=selective", "ac_option=attention"], ["enable_activation_checkpointing=False", "ac_option=op"]):
        assert validate(["--config", str(SFT_8B), "--no-file-check", "mlp_tiles=4", *fine]) == 0


def _peak(model: torch.nn.Module, cfg: TrainConfig, world: int):
    return lambda plan: max(t.total for t in step_terms(model, cfg, world, plan).values())


def _cost(model: torch.nn.Module, cfg: TrainConfig):
    from mirotrain.commands.estimate import _recompute_cost

    return lambda plan: _recompute_cost(model.args, plan, row_tokens(cfg, False))


def _two_level_plans(n: int, tiles: int) -> list:
    """Every plan of two levels, K leading layers at the one that keeps more and the rest at the other."""
    from mirotrain.commands.estimate import mixed_plan

    levels = ("none", "op", "attention", "full") if tiles == 1 else ("none", "attention", "full")
    return [mixed_plan({more: k, less: n - k}, n, tiles) for i, more in enumerate(levels) for less in levels[i + 1:]
            for k in range(n + 1)]


def test_ac_mode_auto_recomputes_least_of_the_plans_that_fit(model):
    """``ac_mode: auto`` with untiled MLPs: of every two-level plan (no recompute, selective op, selective
    attention, full; K leading layers at one, the rest at the other), the one that recomputes least with the
    estimate under 90% of the GPU, found by trying them all; a card with room recomputes less; no GPU size (CPU):
    full AC; a card with room for everything: none."""
    from mirotrain.commands.estimate import GIB, MemoryPlan, memory_plan

    cfg, world, n = _cfg(SFT_8B, "ac_mode=auto", "master_weights=bf16", "loss_chunk_tokens=2048", "mlp_tiles=1"), 2, 36
    peak, cost = _peak(model, cfg, world), _cost(model, cfg)
    peaks = {plan: peak(plan) for plan in set(_two_level_plans(n, 1))}
    assert memory_plan(model, cfg, world, None) == MemoryPlan("full", None, 1)
    assert memory_plan(model, cfg, world, 400 * GIB) == MemoryPlan("none", None, 1)
    costs = []
    for gib in (60, 79.2, 100):
        limit = 0.9 * int(gib * GIB)
        plan = memory_plan(model, cfg, world, int(gib * GIB))
        best = min(cost(p) for p, b in peaks.items() if b <= limit)
        assert peaks[plan] <= limit and cost(plan) == best, gib
        costs.append(best)
    assert costs[0] > costs[1] > costs[2] > 0
    assert memory_plan(model, cfg, world, int(79.2 * GIB)).layer_counts(n)["op"] > 0  # the levels are mixed


SFT_14B_40K = ["ac_mode=auto", "master_weights=bf16", "ulysses_sequence_parallel_size=1", "dataset.packed_seq_len=40960",
               "loss_chunk_tokens=1024"]


def test_ac_mode_auto_and_mlp_tiles_auto_are_chosen_together(capsys):
    """Qwen3-14B at 40K tokens per GPU on 8 cards just too small for the untiled MLP even with full AC. Choosing
    the AC first (untiled: nothing fits, so full AC) and the tiles after gave full AC with the fewest tiles that
    fit; chosen together, the tiles let layers keep more than their input too, recomputing less."""
    from mirotrain.commands.estimate import GIB, MLP_TILE_CHOICES, MemoryPlan, memory_plan

    config, world = CONFIG_ROOT / "qwen3" / "14B_full_sft.yaml", 8
    with torch.device("meta"):
        model = instantiate(load_config(str(config), [])["model"])
    cfg, n = _cfg(config, *SFT_14B_40K), model.args.n_layers
    peak, cost = _peak(model, cfg, world), _cost(model, cfg)
    gib = int((peak(MemoryPlan("full", None, 1)) - 1) / 0.9 / GIB * 4) / 4  # the largest quarter GiB it does not fit
    limit = 0.9 * int(gib * GIB)
    old_tiles = next(t for t in MLP_TILE_CHOICES if peak(MemoryPlan("full", None, t)) <= limit)
    plan = memory_plan(model, cfg, world, int(gib * GIB))
    assert old_tiles > 1 and plan.mlp_tiles > 1 and plan.ac_mode == "auto" and peak(plan) <= limit
    assert cost(plan) < cost(MemoryPlan("full", None, old_tiles))
    assert validate(["--config", str(config), "--world-size", str(world), "--no-file-check", *SFT_14B_40K,
                     "--gpu-memory-gib", str(gib)]) == 0
    out = capsys.readouterr().out
    assert f"plan:        ac_mode: auto: {plan.describe(n)}; by the estimate against 90% of a" in out
    assert f"plan:        mlp_tiles: auto: each MLP runs in {plan.mlp_tiles} tiles" in out


def test_a_card_where_the_untiled_plan_fits_does_not_tile_to_keep_more(model):
    """Qwen3-8B at 40K tokens per GPU on 2 cards of 79.2 GiB: tiles would let the layers keep more (less to
    recompute), but cost one more MLP forward in each of the 36 layers, more than the recompute they spare:
    untiled."""
    from mirotrain.commands.estimate import GIB, memory_plan

    base = ["ac_mode=auto", "master_weights=bf16", "dataset.packed_seq_len=40960", "loss_chunk_tokens=1024"]
    cfg, n = _cfg(SFT_8B, *base), model.args.n_layers
    cost = _cost(model, cfg)
    untiled = memory_plan(model, cfg, 2, int(79.2 * GIB))
    tiled = memory_plan(model, _cfg(SFT_8B, *base, "mlp_tiles=2"), 2, int(79.2 * GIB))  # the best with 2 tiles
    tiles_cost = 6 * model.args.dim * model.args.hidden_dim * n
    assert untiled.mlp_tiles == 1 and tiled.mlp_tiles == 2
    assert cost(tiled) - tiles_cost < cost(untiled) < cost(tiled)


def test_memory_budget_gib_plans_for_less_than_the_card(capsys):
    """P2's shapes (Qwen3-1.7B, one 16K row, one GPU) in the bf16 mode: an H200 holds them without recompute;
    with ``memory_budget_gib`` at the HF baseline's peak (28.2 GiB), auto mixes selective op with selective
    attention up to the budget; a budget above 90% of the card changes nothing."""
    from mirotrain.commands.estimate import GIB, MemoryPlan, memory_plan

    config = CONFIG_ROOT / "qwen3" / "1.7B_full_sft.yaml"
    with torch.device("meta"):
        model = instantiate(load_config(str(config), [])["model"])
    base = ["ac_mode=auto", "master_weights=bf16", "dataset.packed_seq_len=16384", "loss_chunk_tokens=2048"]
    n, h200 = model.args.n_layers, int(139.8 * GIB)
    assert memory_plan(model, _cfg(config, *base), 1, h200) == MemoryPlan("none", None, 1)
    assert memory_plan(model, _cfg(config, *base, "memory_budget_gib=200"), 1, h200) == MemoryPlan("none", None, 1)
    cfg = _cfg(config, *base, "memory_budget_gib=28.2")
    peak = _peak(model, cfg, 1)
    plan = memory_plan(model, cfg, 1, h200)
    op = plan.layer_counts(n)["op"]
    assert plan == MemoryPlan("auto", (0, op, n - op), 1) and 0 < op < n
    assert peak(plan) <= 28.2 * GIB < peak(MemoryPlan("auto", (0, op + 1, n - op - 1), 1))
    assert validate(["--config", str(config), "--world-size", "1", "--no-file-check", *base, "memory_budget_gib=28.2",
                     "--gpu-memory-gib", "139.8"]) == 0
    assert (f"plan:        ac_mode: auto: {op} of {n} layers keep their matmul and attention outputs (selective op), "
            f"{n - op} of {n} layers keep their attention outputs (selective attention); by the estimate against "
            "memory_budget_gib (28.2 GiB)") in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["ac_mode=full", "mlp_tiles=1", "memory_budget_gib=40"],
     "config key 'memory_budget_gib': is read only where ac_mode: auto or mlp_tiles: auto has something to decide"),
    (["ac_mode=selective", "ac_option=op", "memory_budget_gib=40"],  # mlp_tiles: auto, 1 under per-op selective AC
     "config key 'memory_budget_gib': is read only where ac_mode: auto or mlp_tiles: auto has something to decide"),
    (["ac_mode=auto", "memory_budget_gib=0"], "config key 'memory_budget_gib': must be > 0, got 0"),
])
def test_a_memory_budget_nothing_reads_or_below_zero_is_refused(overrides, message, capsys):
    assert validate(["--config", str(SFT_8B), "--no-file-check", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_a_budget_nothing_fits_is_warned_of(capsys):
    """Qwen3-8B at 16K on 2 GPUs cannot come under 20 GiB: the plan of the lowest estimate, and a warning."""
    assert validate(["--config", str(SFT_8B), "--world-size", "2", "--no-file-check", "ac_mode=auto",
                     "master_weights=bf16", "memory_budget_gib=20", "--gpu-memory-gib", "79.2"]) == 0
    out = capsys.readouterr().out
    assert "warning:     that is above memory_budget_gib (20 GiB): no plan of the auto settings fits it" in out


def test_validate_prints_the_auto_plan(capsys):
    assert validate(["--config", str(SFT_8B), "--world-size", "2", "--no-file-check", "ac_mode=auto",
                     "master_weights=bf16", "--gpu-memory-gib", "79.2"]) == 0
    out = capsys.readouterr().out
    assert "plan:        ac_mode: auto: " in out and "; by the estimate against 90% of a 79.2 GiB GPU" in out


def test_ac_option_or_activation_offloading_with_ac_mode_auto_is_refused(capsys):
    assert validate(["--config", str(SFT_8B), "--no-file-check", "ac_mode=auto", "ac_option=2"]) == 2
    assert "config key 'ac_option': ac_mode: auto decides per layer itself; remove ac_option (2)" in \
        capsys.readouterr().err
    assert validate(["--config", str(SFT_8B), "--no-file-check", "ac_mode=auto",
                     "enable_activation_offloading=True"]) == 2
    assert "config key 'ac_mode': auto decides which layers keep their activations on the GPU" in \
        capsys.readouterr().err


@pytest.mark.parametrize("config, tiles, message", [
    (CONFIG_ROOT / "qwen3_moe" / "30B_A3B_full_sft.yaml", 4, "(4) tiles dense MLPs; this MoE model has none"),
    (SFT_8B, 12289, "(12289) must be at most the MLP hidden width (12288)"),
])
def test_mlp_tiles_the_model_cannot_take_are_refused(config, tiles, message, capsys):
    assert validate(["--config", str(config), "--world-size", "8", "--no-file-check", f"mlp_tiles={tiles}"]) == 2
    assert f"config key 'mlp_tiles': {message}" in capsys.readouterr().err


def test_optimizer_state_offload_keeps_weights_and_gradients_on_the_gpu(model):
    """master_weights: bf16 with optimizer_state_offload: of the 10 bytes/param, the weights and gradients (4)
    stay sharded on the GPU and the moments and compensation (6) are in host memory; the optimizer step streams
    them through the GPU in flat buffers (compiled too), 30 bytes per element of its largest chunk."""
    n_params = sum(p.numel() for p in model.parameters())
    resident = step_terms(model, _cfg(SFT_8B, "master_weights=bf16"), WORLD)
    cfg = _cfg(SFT_8B, "master_weights=bf16", "optimizer_state_offload=True")
    offloaded = step_terms(model, cfg, WORLD)
    assert offloaded["optimizer step"].sharded_state == 4 * n_params // WORLD
    assert offloaded["loss in the forward"].sharded_state == 2 * n_params // WORLD
    assert offloaded["optimizer step"].buffers == 30 * (151936 * 4096 // WORLD)
    for moment, terms in offloaded.items():
        assert terms.activations == resident[moment].activations and terms.loss == resident[moment].loss
        assert resident[moment].sharded_state - terms.sharded_state == 6 * n_params // WORLD
    estimate = estimate_memory(model, cfg, WORLD)
    assert estimate.optimizer_offload and not estimate.offload and estimate.state_bytes_per_param == 10
    assert estimate.host_state_per_rank == 6 * n_params // WORLD
    assert estimate_memory(model, _cfg(SFT_8B, "master_weights=bf16"), WORLD).host_state_per_rank == 0


def test_validate_reports_the_offloaded_optimizer_state_and_the_host_memory(capsys):
    """Full-depth Qwen3-30B-A3B on 2 GPUs at 16K tokens each: ~57 GiB of bf16 weights and gradients per GPU,
    6 B/param × 30.53B = 170.6 GiB of pinned optimizer state on the node, plus 8 B/param of async checkpoint
    staging; the host line adds them up."""
    moe = CONFIG_ROOT / "qwen3_moe" / "30B_A3B_full_sft_2xH200.yaml"
    args = ["--config", str(moe), "--world-size", "2", "--gpus-per-node", "2", "--gpu-memory-gib", "139",
            "--no-file-check", "ulysses_sequence_parallel_size=1", "dataset.packed_seq_len=16384",
            "tokenizer.max_seq_len=16384", "gradient_accumulation_steps=1", "loss_chunk_tokens=4096",
            "master_weights=bf16", "optimizer_state_offload=True"]
    assert validate(args) == 0
    out = {line[:12]: line for line in capsys.readouterr().out.splitlines()}
    assert out["memory/GPU: "].startswith("memory/GPU:  ~62.3 GiB at the end of the backward (sharded state 56.3,")
    assert out["state:      "].endswith("sharded over 2 ranks, on the GPU: weights and gradients 4; AdamW moments and "
                                        "compensation 6 in host memory (optimizer_state_offload): ~170.6 GiB pinned "
                                        "per node of 2 GPUs, streamed through each GPU at every step")
    assert out["host memory:"].startswith("host memory: ~398.1 GiB per node of 2 GPUs (optimizer state 170.6 + async "
                                          "checkpoint staging 227.5; available on this host: ")


@pytest.mark.parametrize("overrides, message", [
    (("dtype=bf16", "master_weights=bf16_plain"), "moves the moments and compensation of the compensated AdamW "
                                                  "(master_weights: bf16) to host memory; got master_weights: bf16_plain"),
    (("master_weights=fp32",), "moves the moments and compensation of the compensated AdamW (master_weights: "
                               "bf16) to host memory; got master_weights: fp32"),
    (("dtype=bf16", "master_weights=bf16", "fsdp_cpu_offload=True"),
     "excludes fsdp_cpu_offload, which keeps the whole sharded state (weights, gradients and optimizer) in host memory"),
])
def test_optimizer_state_offload_needs_the_bf16_mode_without_fsdp_cpu_offload(capsys, overrides, message):
    tiny = str(CONFIG_ROOT / "tiny" / "sft.yaml")
    assert validate(["--config", tiny, "--no-file-check", "optimizer_state_offload=True", *overrides]) == 2
    assert f"config key 'optimizer_state_offload': {message}" in capsys.readouterr().err
