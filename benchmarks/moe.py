"""Qwen3-30B-A3B-shaped MoE training throughput: mirotrain with expert parallelism vs HF transformers.

What runs (one `torchrun`, every rank one GPU, one row of --seq random tokens per rank per step):
  1. mirotrain, EP = --ep (default: the world), 30B-A3B layer shapes at full width (hidden 2048, 128 experts
     of 768, top-8, 32/4 heads) with --layers layers ("auto": the deepest model that fits, below), the
     trainer's path: expert sharding -> activation checkpointing (--ac: full, or none) -> FSDP2 (bf16
     compute; --master-weights fp32: fp32 master weights and reduce, torch's fused AdamW; bf16: bf16 weights
     and reduce with the compensated AdamW, with --optimizer-offload its moments and compensation in pinned host
     memory, streamed through the GPU at each step (optimizer_state_offload, mirotrain/optim/host_state.py);
     bf16_plain: bf16 with torch's AdamW, mirotrain/optim/precision.py;
     experts over "edp" with the DP-size divide factor), fused chunked linear CE + router aux loss (coef 0.001, statistics over
     all ranks), global-norm clipping. Once with the grouped expert backend (torch._grouped_mm) at that
     depth, then grouped_mm and the per-expert loop at --hf-layers layers (same depth as the HF row; the
     grouped-mm speed-up is the ratio of these two).
  2. HF transformers Qwen3MoeForCausalLM on one GPU with the same layer shapes at --hf-layers layers
     (../shared/baselines/hf_moe_single_gpu.py: fp32 weights + bf16 autocast, SDPA, activation
     checkpointing, fused AdamW, aux loss on; run unchanged by benchmarks/hf_moe_routed.py, which adds the
     routing and the load meter), before our rows, on rank 0's GPU while the other ranks wait.
--routing random (default) keeps the routers' own choices (random weights: very uneven); balanced forces
every expert to the same load in both systems alike (benchmarks/moe_routing.py: the gate's logits become a
round-robin pattern, Megatron's forced load balancing). Each row reports its busiest expert's load over the
mean ("load max/mean", the worst layer; 1.00 = balanced) and, for ours, the busiest EP rank's rows over the
mean over the EP ranks ("rank max/mean": with EP the step waits for that rank). With --optimizer-offload a row also
reports its optimizer step's median time (the state's copies to the GPU and back dominate it), the first step's
(with the pinned host allocation) and the host memory of each rank's state.
Reported per row: tokens/s/GPU, MFU over *active* parameters (Megatron-style causal FLOPs, the baseline's
formula: 6 * active matmul params + 6 * L * H * hd * S per token; LM head counted, embedding not) against
the measured bf16 matmul peak and against 989 TFLOP/s, the equivalent tokens/s/GPU of the 48-layer model
at that MFU (comparable with the public 30B-A3B anchors), peak memory and step time.
--layers auto is the deepest model whose `mirotrain validate` estimate (the shipped 2x H200 30B-A3B config
at this layout: --seq tokens per GPU, SP 1, EP --ep, GA 1, --master-weights) plus the MoE dispatch copies
the estimate leaves out (docs/moe.md) stays under 90% of this GPU; on 2x H200 at 16K tokens and EP=2:
fp32 24 layers, bf16 39, bf16_plain 48, bf16 with --optimizer-offload 48 (docs/benchmarks.md, "Full-depth 30B-A3B
on 2x H200 at 16K tokens").

Usage:
  torchrun --nproc_per_node 4 benchmarks/moe.py [--layers auto] [--seq 4096] [--hf-layers 4] [--json $OUT/moe.json]
  torchrun --nproc_per_node 2 benchmarks/moe.py --seq 16384 --ep 2 --hf-layers 6 --skip-loop --routing balanced
  torchrun --nproc_per_node 2 benchmarks/moe.py --seq 16384 --ep 2 --layers auto --master-weights bf16 \
      --skip-hf --skip-loop --routing balanced --steps 10     # the deepest model that fits, 10 steps
  torchrun --nproc_per_node 2 benchmarks/moe.py --seq 16384 --ep 2 --layers 48 --master-weights bf16 \
      --optimizer-offload --skip-hf --skip-loop --routing balanced --steps 10   # full depth, state on the host
  torchrun --nproc_per_node 4 benchmarks/moe.py --skip-hf --skip-loop --layers 24    # ours only
  python benchmarks/moe.py --cpu-smoke [--routing balanced]   # tiny model, 1 CPU process (gloo), HF tiny in-process
On the GPU machine the baseline travels as .baselines/ (see benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json)
FULL = dict(vocab=151936, dim=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, moe_hidden=768, layers=48)
TINY = dict(vocab=512, dim=64, heads=8, kv_heads=1, head_dim=16, experts=8, top_k=2, moe_hidden=32, layers=2)
NOMINAL_PEAK_TFLOPS = 989.0  # H100 SXM / H200 bf16 dense


def flops_per_token(shape: dict, layers: int, seq: int) -> float:
    """Active causal FLOPs per token (fwd + bwd), as the HF baseline counts them."""
    d, h, kv, hd = shape["dim"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    attn = d * h * hd * 2 + d * kv * hd * 2
    active = layers * (attn + d * shape["experts"] + shape["top_k"] * 3 * d * shape["moe_hidden"]) + shape["vocab"] * d
    return 6 * active + 6 * layers * h * hd * seq


# The shipped 2x H200 recipe: the same model and trainer path as our rows; auto_layers sets its layout to ours.
SHIPPED_CONFIG = ROOT / "mirotrain" / "configs" / "qwen3_moe" / "30B_A3B_full_sft_2xH200.yaml"


def dispatch_copy_bytes(shape: dict, tokens: int, compute_bytes: int = 2) -> int:
    """What validate's estimate leaves out of an MoE layer (docs/moe.md, "What validate's estimate leaves out
    for MoE"): per token (3kD + kF) saved for backward, kD of their gradients and 2kD of EP all-to-all buffers.
    An upper bound by kD: the dispatch's reorderings no longer keep the expert outputs (modules/moe/permute.py)."""
    k, d, f = shape["top_k"], shape["dim"], shape["moe_hidden"]
    return (6 * k * d + k * f) * compute_bytes * tokens


def dispatch_saved_bytes(shape: dict, tokens: int, compute_bytes: int = 2) -> int:
    """The part of ``dispatch_copy_bytes`` a layer keeps until its backward, (3kD + kF) per token: without
    activation checkpointing every layer holds it at once."""
    k, d, f = shape["top_k"], shape["dim"], shape["moe_hidden"]
    return (3 * k * d + k * f) * compute_bytes * tokens


def estimated_peak_bytes(layers: int, world: int, ep: int, seq: int, master_weights: str, ac: str = "full",
                         optimizer_offload: bool = False) -> int:
    """`mirotrain validate`'s per-GPU estimate of our row (the shipped 2x H200 config at this layout, ``ac`` its
    ``ac_mode``, ``optimizer_offload`` its ``optimizer_state_offload``) plus the running layer's MoE dispatch
    copies (with no AC the estimate counts every layer's saved part: mirotrain/commands/step_memory.py)."""
    from mirotrain.commands.estimate import estimate_memory
    from mirotrain.config import instantiate, load_config
    from mirotrain.config.tree import TrainConfig
    from mirotrain.modules.loss.linear_ce import DEFAULT_CHUNK_TOKENS

    raw = load_config(SHIPPED_CONFIG, [
        f"model.n_layers={layers}", f"master_weights={master_weights}", f"moe_expert_parallel_size={ep}",
        "ulysses_sequence_parallel_size=1", f"dataset.packed_seq_len={seq}", f"tokenizer.max_seq_len={seq}",
        "gradient_accumulation_steps=1", f"loss_chunk_tokens={DEFAULT_CHUNK_TOKENS}",  # our LinearCrossEntropyLoss()
        f"ac_mode={ac}", f"optimizer_state_offload={optimizer_offload}"])
    with torch.device("meta"):
        model = instantiate(raw["model"])
    estimate = estimate_memory(model, TrainConfig.from_dict(raw), world)
    # with no AC the estimate counts every kept layer's dispatch saves, the running layer's among them, which
    # dispatch_copy_bytes counts too
    counted = dispatch_saved_bytes(FULL, seq) if ac == "none" else 0
    return estimate.total + dispatch_copy_bytes(FULL, seq) - counted


def auto_layers(world: int, ep: int, seq: int, gpu_bytes: int, master_weights: str, ac: str,
                optimizer_offload: bool = False) -> int:
    """The deepest 30B-A3B (at most 48 layers) whose estimated peak stays under 90% of the GPU (at least 1)."""
    from mirotrain.commands.estimate import MEMORY_WARN_FRACTION

    low, high = 1, FULL["layers"]
    while low < high:  # the estimate grows with depth
        mid = (low + high + 1) // 2
        if estimated_peak_bytes(mid, world, ep, seq, master_weights, ac, optimizer_offload) <= \
                MEMORY_WARN_FRACTION * gpu_bytes:
            low = mid
        else:
            high = mid - 1
    return low


# ------------------------------------------------------------------------------------------------ ours


def build_ours(shape: dict, layers: int, backend: str, seq: int, device: torch.device, param_dtype: torch.dtype):
    """On the meta device, its parameters in ``param_dtype`` (what the sharded weights are kept in)."""
    from mirotrain.models.qwen3_moe import qwen3_moe
    from mirotrain.training.builders import cast_parameters

    with torch.device("meta"):
        model = qwen3_moe(vocab_size=shape["vocab"], dim=shape["dim"], n_layers=layers, n_heads=shape["heads"],
                          n_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], hidden_dim=3 * shape["dim"],
                          num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
                          moe_hidden_dim=shape["moe_hidden"], max_seq_len=max(seq, 40960), tie_word_embeddings=False,
                          router_aux_loss_coef=0.001, moe_backend=backend,
                          attention_backend="auto" if device.type == "cuda" else "sdpa")
    cast_parameters(model, param_dtype)
    return model


@torch.no_grad()
def init_on_device(model, seed: int) -> None:
    """Random weights drawn on the device, shard by shard (a CPU draw of the full model takes minutes)."""
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        else:
            local.normal_(0.0, 0.02, generator=gen)
    model.rope.reset_parameters()


def run_ours(ns, shape: dict, layers: int, backend: str, device: torch.device) -> dict:
    from mirotrain.models.qwen3_moe.parallelize import parallelize_qwen3_moe
    from mirotrain.modules.loss import LinearCrossEntropyLoss
    from mirotrain.optim.precision import MODES
    from mirotrain.parallel.expert_parallel import check_expert_parallel
    from mirotrain.parallel.mesh import ParallelDims
    from mirotrain.parallel.options import ParallelizeOptions
    from mirotrain.training.grad_clip import clip_grad_norm_

    world, rank = dist.get_world_size(), dist.get_rank()
    ep = ns.ep or world
    check_expert_parallel(shape["experts"], world, ep)
    meshes = ParallelDims(world, ep=ep).build_mesh(device.type)
    mode = MODES[ns.master_weights]
    model = build_ours(shape, layers, backend, ns.seq, device, mode.param_dtype)
    parallelize_qwen3_moe(model, meshes, ParallelizeOptions(
        device_type=device.type, ac_mode=ns.ac, reduce_dtype=mode.reduce_dtype,
        param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32))
    model.to_empty(device=device)
    model.rope.to(device)
    init_on_device(model, seed=rank)
    if ns.routing == "balanced":
        from benchmarks.moe_routing import install_balanced_routing

        install_balanced_routing(model, shape["experts"], shape["top_k"])
    loss_fn = LinearCrossEntropyLoss()
    opt = build_optimizer(model, ns.master_weights, fused=device.type == "cuda", offload_state=ns.optimizer_offload)
    gen = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, shape["vocab"], (1, ns.seq), generator=gen).to(device)
    labels = torch.randint(0, shape["vocab"], (1, ns.seq), generator=gen).to(device)
    n_global = torch.tensor(float(ns.seq * world), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, opt_times = [], []
    for step in range(ns.warmup + ns.steps):
        _sync(device)
        t0 = time.perf_counter()
        hidden = model.forward_hidden(ids)
        loss_sum, _ = loss_fn(hidden, model.lm_head_weight, labels)
        # CE share = local sum / global count; x world because FSDP averages over the world
        loss = (loss_sum / n_global + model.moe_aux_loss(dist.group.WORLD)) * world
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        if ns.optimizer_offload:  # the optimizer step alone: the state's copies to the GPU and back
            _sync(device)
            t_opt = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if ns.optimizer_offload:
            opt_times.append(time.perf_counter() - t_opt)
        if step >= ns.warmup:
            times.append(time.perf_counter() - t0)
    ce = loss_sum.detach() / n_global
    dist.all_reduce(ce)  # the mean token loss over all ranks (each rank's loss_sum is its share)
    loss_value = ce.item()
    load = model.expert_load_stats(dist.group.WORLD)
    rank_load = busiest_rank_load(model, ep)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0
    step_s = statistics.median(times)
    offload = offload_figures(opt, opt_times[0], statistics.median(opt_times[ns.warmup:])) if ns.optimizer_offload else {}
    release_memory(model, opt)
    del model, opt, hidden, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(system="mirotrain", gpus=world, ep=ep, layers=layers, seq=ns.seq, experts=backend,
                routing=ns.routing, master_weights=ns.master_weights, ac=ns.ac, optimizer_offload=ns.optimizer_offload,
                **offload, step_s=step_s, tok_s_gpu=ns.seq / step_s,
                peak_gib=peak, reserved_gib=reserved, loss=loss_value,
                max_over_mean_load=load["moe/max_over_mean_load"], rank_max_over_mean=rank_load,
                estimated_gib=estimated_peak_bytes(layers, world, ep, ns.seq, ns.master_weights, ns.ac,
                                                   ns.optimizer_offload) / 2**30
                if device.type == "cuda" else 0.0)


@torch.no_grad()
def release_memory(model, opt: torch.optim.Optimizer) -> None:
    """Free a finished row's weights, optimizer state and router statistics in place.

    Deleting the objects is not enough: once it has run a forward, a model with per-layer FSDP2 units stays
    reachable after ``gc.collect()`` (torch 2.13; even a toy ModuleList of two ``fully_shard``-ed blocks does,
    through references the collector cannot see), so the next row's peak included the previous model (the
    6-layer rows measured 99.5 GiB after the 20-layer one, against an estimate of 41)."""
    opt.state.clear()
    for p in model.parameters():
        (p.to_local() if hasattr(p, "to_local") else p).untyped_storage().resize_(0)
    for moe in model.moe_layers():
        moe.router.stats = None


def busiest_rank_load(model, ep: int) -> float:
    """The worst layer's busiest EP rank: the rows its experts received in the last forward over the mean over
    the EP ranks (a collective). The step waits for that rank; 1.00 = every rank computes the same rows. Loads are
    summed over the whole world: with EP smaller than the world the EP groups' loads add up, and the ratio is
    that of their sum (as run here, EP = world)."""
    from mirotrain.modules.moe import expert_load

    load = expert_load([moe.router.stats for moe in model.moe_layers()], dist.group.WORLD)  # [L, E]
    per_rank = load.view(load.shape[0], ep, -1).sum(-1)  # [L, EP]: owner i holds experts [i*E/EP, (i+1)*E/EP)
    return float((per_rank.max(dim=1).values / per_rank.mean(dim=1).clamp_min(1e-9)).max())


def offload_figures(opt: torch.optim.Optimizer, first_s: float, median_s: float) -> dict:
    """An offloaded optimizer's step times (the first one allocates and page-locks the host state) and the host
    memory of this rank's state."""
    host = sum((v.to_local() if hasattr(v, "to_local") else v).nbytes
               for state in opt.state.values() for k, v in state.items() if k != "step")
    return dict(opt_s=median_s, first_opt_s=first_s, host_state_gib=host / 2**30)


def build_optimizer(model, master_weights: str, fused: bool, offload_state: bool = False) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it for ``master_weights`` (mirotrain/training/builders.py), lr 1e-5, with one
    param group per mesh: a fused kernel runs per group, never mixing dense and expert DTensors (``fused``: also the
    compensated AdamW's compiled kernel, as the trainer compiles it on GPUs). ``offload_state``:
    the compensated AdamW's state in host memory (``optimizer_state_offload``; bf16 only)."""
    from mirotrain.optim.bf16_adamw import CompensatedAdamW

    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    others = [p for n, p in model.named_parameters() if ".experts." not in n]
    groups = [{"params": others}, {"params": experts}]
    if master_weights == "bf16":
        return CompensatedAdamW(groups, lr=1e-5, offload_state=offload_state, compiled=fused)
    return torch.optim.AdamW(groups, lr=1e-5, fused=fused)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------- HF


def run_hf_script(layers: int, seq: int, impl: str, routing: str) -> dict:
    """The shared single-GPU baseline in its own process, through benchmarks/hf_moe_routed.py (the baseline's
    JSON line, then the wrapper's with the expert load)."""
    wrapper = ROOT / "benchmarks" / "hf_moe_routed.py"
    proc = subprocess.run([sys.executable, str(wrapper), "--routing", routing, str(layers), str(seq), impl],
                          capture_output=True, text=True, timeout=420)
    out: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    if proc.returncode != 0 or "tok_s" not in out or "max_over_mean_load" not in out:
        return dict(system=f"hf-{impl}", error=(proc.stderr or proc.stdout)[-600:], layers=layers, seq=seq)
    return dict(system="hf transformers", gpus=1, ep=1, layers=layers, seq=seq, experts=impl, routing=routing,
                master_weights="fp32", step_s=seq / out["tok_s"], tok_s_gpu=float(out["tok_s"]),
                peak_gib=out.get("peak_gib", 0.0), loss=out.get("loss"), max_over_mean_load=out["max_over_mean_load"])


def run_hf_tiny_cpu(shape: dict, layers: int, seq: int, impl: str, routing: str) -> dict:
    """CPU smoke stand-in for the baseline script (same recipe minus CUDA and autocast)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from benchmarks.hf_moe_routed import instrument_hf_moe

    cfg = Qwen3MoeConfig(vocab_size=shape["vocab"], hidden_size=shape["dim"], num_hidden_layers=layers,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         head_dim=shape["head_dim"], intermediate_size=3 * shape["dim"],
                         moe_intermediate_size=shape["moe_hidden"], num_experts=shape["experts"],
                         num_experts_per_tok=shape["top_k"], norm_topk_prob=True, output_router_logits=True,
                         router_aux_loss_coef=0.001, experts_implementation=impl)
    torch.manual_seed(0)
    meters = instrument_hf_moe(routing)
    model = Qwen3MoeForCausalLM(cfg)
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(0, shape["vocab"], (1, seq))
    times = []
    for step in range(4):
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 1:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return dict(system="hf transformers", gpus=1, ep=1, layers=layers, seq=seq, experts=impl, routing=routing,
                master_weights="fp32", step_s=step_s, tok_s_gpu=seq / step_s, peak_gib=0.0, loss=out.loss.item(),
                max_over_mean_load=meters[-1].max_over_mean())


# ----------------------------------------------------------------------------------------------- table


def add_mfu(row: dict, shape: dict, peak_tflops: float) -> dict:
    if "error" in row:
        return row
    fpt = flops_per_token(shape, row["layers"], row["seq"])
    tflops = row["tok_s_gpu"] * fpt / 1e12
    row.update(tflops=tflops, mfu_measured=tflops / peak_tflops, mfu_nominal=tflops / NOMINAL_PEAK_TFLOPS,
               tok_s_gpu_48l=tflops * 1e12 / flops_per_token(shape, FULL["layers"], row["seq"]))
    return row


def format_table(rows: list[dict], peak_tflops: float) -> str:
    head = ("system", "GPUs", "EP", "layers", "seq", "experts", "routing", "load max/mean", "rank max/mean",
            "weights", "AC", "tok/s/GPU", "TFLOP/s", "MFU(meas)", "MFU(989)", "tok/s/GPU@48L", "peak GiB", "est. GiB",
            "step s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['system']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        lines.append(" | ".join(str(v) for v in (
            r["system"], r["gpus"], r["ep"], r["layers"], r["seq"], r["experts"], r["routing"],
            f"{r['max_over_mean_load']:.2f}", f"{r['rank_max_over_mean']:.2f}" if "rank_max_over_mean" in r else "-",
            r["master_weights"] + ("+offload" if r.get("optimizer_offload") else ""), r.get("ac", "full"),
            f"{r['tok_s_gpu']:.0f}",
            f"{r['tflops']:.1f}", f"{100 * r['mfu_measured']:.1f}%", f"{100 * r['mfu_nominal']:.1f}%",
            f"{r['tok_s_gpu_48l']:.0f}", f"{r['peak_gib']:.1f}", f"{r.get('estimated_gib', 0.0):.1f}",
            f"{r['step_s']:.3f}")))
    ours = {(r["layers"], r["experts"]): r for r in rows if r.get("system") == "mirotrain" and "error" not in r}
    for (layers, backend), r in ours.items():
        if backend == "loop" and (layers, "grouped_mm") in ours:
            lines.append(f"\ngrouped_mm vs loop at {layers} layers: "
                         f"{ours[(layers, 'grouped_mm')]['tok_s_gpu'] / r['tok_s_gpu']:.2f}x")
    for r in rows:
        if r.get("optimizer_offload") and "error" not in r:
            lines.append(f"optimizer state offloaded ({r['layers']} layers): {r['host_state_gib']:.1f} GiB of host "
                         f"memory per rank; optimizer step {r['opt_s']:.2f} s (the first, with the pinned allocation, "
                         f"{r['first_opt_s']:.1f} s)")
    lines.append(f"matmul peak (measured bf16): {peak_tflops:.0f} TFLOP/s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="auto",
                        help="layers of our EP model ('auto': the deepest that validate's estimate fits, see above)")
    parser.add_argument("--hf-layers", type=int, default=4, help="layers of the single-GPU HF run (and our same-depth row)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--ep", type=int, default=0, help="expert-parallel size (default: world size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hf-impls", default="grouped_mm", help="comma list of HF experts_implementation values")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--routing", choices=("random", "balanced"), default="random",
                        help="the routers' own choices, or every expert the same load (ours and HF alike)")
    parser.add_argument("--master-weights", choices=("fp32", "bf16", "bf16_plain"), default="fp32",
                        help="what our sharded weights and AdamW state are kept in (mirotrain/optim/precision.py)")
    parser.add_argument("--optimizer-offload", action="store_true",
                        help="--master-weights bf16 only: the compensated AdamW's moments and compensation in pinned "
                             "host memory, streamed through the GPU at each step (optimizer_state_offload)")
    parser.add_argument("--ac", choices=("full", "none"), default="full",
                        help="our layers' activation checkpointing (ac_mode): full recomputes each layer's forward "
                             "in its backward; none keeps every layer's activations (shallow models at 16K fit)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 1 CPU process (gloo)")
    ns = parser.parse_args()
    if ns.optimizer_offload and ns.master_weights != "bf16":
        parser.error("--optimizer-offload moves the compensated AdamW's state: it needs --master-weights bf16")

    if ns.cpu_smoke:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        device, shape = torch.device("cpu"), TINY
        ns.seq, ns.steps, ns.warmup = min(ns.seq, 128), 2, 1
        peak = 1.0  # MFU is meaningless on CPU; the column only checks the plumbing
    else:
        from mirotrain.commands.cuda_alloc import alloc_conf_default

        alloc_conf_default()  # expandable segments, as `mirotrain sft` runs and validate's estimate assumes
        dist.init_process_group("nccl")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, shape = torch.device("cuda", local), FULL
        from benchmarks.common import matmul_peak_tflops

        peak = matmul_peak_tflops()
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = ns.ep or world
    if ns.layers == "auto":
        layers = TINY["layers"] if ns.cpu_smoke else auto_layers(
            world, ep, ns.seq, torch.cuda.get_device_properties(device).total_memory, ns.master_weights, ns.ac,
            ns.optimizer_offload)
        if rank == 0:
            print(f"--layers auto: {layers} layers (validate's estimate + dispatch copies under 90% of the GPU)",
                  flush=True)
    else:
        layers = int(ns.layers)
    hf_layers = 1 if ns.cpu_smoke else ns.hf_layers

    # The HF baseline runs first, on rank 0's GPU while the other ranks wait: once our model has run, rank 0's
    # process keeps ~37 GiB (NCCL and compile workspaces) that empty_cache does not hand back, and the 4-layer
    # HF model (fp32 weights + AdamW, ~55 GiB at 4K tokens) no longer fits beside it. At 16K tokens HF's 6 layers
    # take ~65 GiB of state and up to ~30 GiB in the loss (full fp32 logits and their gradient): use
    # --hf-layers 6 there (8 would be ~110 GiB).
    hf_rows = []
    if rank == 0 and not ns.skip_hf:
        for impl in ns.hf_impls.split(","):
            row = (run_hf_tiny_cpu(shape, hf_layers, ns.seq, impl, ns.routing) if ns.cpu_smoke
                   else run_hf_script(hf_layers, ns.seq, impl, ns.routing))
            hf_rows.append(row)
            print(json.dumps(row), flush=True)
    dist.barrier()

    # The loop backend runs at the HF row's depth: its per-expert activations do not fit at full depth, and an
    # OOM need not hit every rank at once (routing is uneven), which would leave the others hung in a collective.
    plan = [(layers, "grouped_mm")]
    if hf_layers != layers and not (ns.skip_hf and ns.skip_loop):
        plan.append((hf_layers, "grouped_mm"))
    if not ns.skip_loop:
        plan.append((hf_layers, "loop"))
    rows = []
    for n_layers, backend in plan:
        try:
            rows.append(run_ours(ns, shape, n_layers, backend, device))
        except torch.OutOfMemoryError as err:
            rows.append(dict(system="mirotrain", layers=n_layers, seq=ns.seq, experts=backend, error=f"OOM: {err}"[:300]))
            gc.collect()
            torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return
    rows += hf_rows
    rows = [add_mfu(r, shape, peak) for r in rows]
    print()
    print(format_table(rows, peak))
    if ns.json:
        Path(ns.json).write_text(json.dumps(dict(peak_tflops=peak, rows=rows), indent=2))


if __name__ == "__main__":
    main()
