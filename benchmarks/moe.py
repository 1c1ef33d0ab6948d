"""Qwen3-30B-A3B-shaped MoE training throughput: mirotrain with expert parallelism vs HF transformers.

What runs (one `torchrun`, every rank one GPU, one row of --seq random tokens per rank per step):
  1. mirotrain, EP = world (default 4), 30B-A3B layer shapes at full width (hidden 2048, 128 experts of
     768, top-8, 32/4 heads) with --layers layers ("auto": as many as fit), the trainer's path: expert
     sharding -> full activation checkpointing -> FSDP2 (bf16 compute, fp32 master weights and reduce;
     experts over "edp" with the DP-size divide factor), fused chunked linear CE + router aux loss
     (coef 0.001, statistics over all ranks), global-norm clipping, fused AdamW. Once with the grouped
     expert backend (torch._grouped_mm) at that depth, then grouped_mm and the per-expert loop at
     --hf-layers layers (same depth as the HF row; the grouped-mm speed-up is the ratio of these two).
  2. HF transformers Qwen3MoeForCausalLM on one GPU with the same layer shapes at --hf-layers layers
     (../shared/baselines/hf_moe_single_gpu.py: fp32 weights + bf16 autocast, SDPA, activation
     checkpointing, fused AdamW, aux loss on), after our process group is gone, on rank 0's GPU.
Reported per row: tokens/s/GPU, MFU over *active* parameters (Megatron-style causal FLOPs, the baseline's
formula: 6 * active matmul params + 6 * L * H * hd * S per token; LM head counted, embedding not) against
the measured bf16 matmul peak and against 989 TFLOP/s, the equivalent tokens/s/GPU of the 48-layer model
at that MFU (comparable with the public 30B-A3B anchors), peak memory and step time.

Usage:
  torchrun --nproc_per_node 4 benchmarks/moe.py [--layers auto] [--seq 4096] [--hf-layers 4] [--json $OUT/moe.json]
  torchrun --nproc_per_node 4 benchmarks/moe.py --skip-hf --skip-loop --layers 24    # ours only
  python benchmarks/moe.py --cpu-smoke        # tiny model, 1 CPU process (gloo), HF tiny in-process
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


def auto_layers(world: int, ep: int, mem_bytes: int, shape: dict) -> int:
    """Layers whose fp32 params + grads + AdamW state (16 B/param) fill ~70% of a GPU (rest: activations)."""
    d, h, kv, hd = shape["dim"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    dense = d * h * hd * 2 + d * kv * hd * 2 + d * shape["experts"]
    experts = shape["experts"] * 3 * d * shape["moe_hidden"]
    per_layer = 16 * (dense / world + experts / ep)
    root = 16 * 2 * shape["vocab"] * d / world
    return max(1, int((0.70 * mem_bytes - root) // per_layer))


# ------------------------------------------------------------------------------------------------ ours


def build_ours(shape: dict, layers: int, backend: str, seq: int, device: torch.device):
    from mirotrain.models.qwen3_moe import qwen3_moe

    with torch.device("meta"):
        return qwen3_moe(vocab_size=shape["vocab"], dim=shape["dim"], n_layers=layers, n_heads=shape["heads"],
                         n_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], hidden_dim=3 * shape["dim"],
                         num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
                         moe_hidden_dim=shape["moe_hidden"], max_seq_len=max(seq, 40960), tie_word_embeddings=False,
                         router_aux_loss_coef=0.001, moe_backend=backend,
                         attention_backend="auto" if device.type == "cuda" else "sdpa")


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
    from mirotrain.parallel.expert_parallel import check_expert_parallel
    from mirotrain.parallel.mesh import ParallelDims
    from mirotrain.parallel.options import ParallelizeOptions
    from mirotrain.training.grad_clip import clip_grad_norm_

    world, rank = dist.get_world_size(), dist.get_rank()
    ep = ns.ep or world
    check_expert_parallel(shape["experts"], world, ep)
    meshes = ParallelDims(world, ep=ep).build_mesh(device.type)
    model = build_ours(shape, layers, backend, ns.seq, device)
    parallelize_qwen3_moe(model, meshes, ParallelizeOptions(
        device_type=device.type, ac_mode="full",
        param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32))
    model.to_empty(device=device)
    model.rope.to(device)
    init_on_device(model, seed=rank)
    loss_fn = LinearCrossEntropyLoss()
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    others = [p for n, p in model.named_parameters() if ".experts." not in n]
    # one param group per mesh: the fused kernel runs per group, never mixing dense and expert DTensors
    opt = torch.optim.AdamW([{"params": others}, {"params": experts}], lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, shape["vocab"], (1, ns.seq), generator=gen).to(device)
    labels = torch.randint(0, shape["vocab"], (1, ns.seq), generator=gen).to(device)
    n_global = torch.tensor(float(ns.seq * world), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(ns.warmup + ns.steps):
        _sync(device)
        t0 = time.perf_counter()
        hidden = model.forward_hidden(ids)
        loss_sum, _ = loss_fn(hidden, model.lm_head_weight, labels)
        # CE share = local sum / global count; x world because FSDP averages over the world
        loss = (loss_sum / n_global + model.moe_aux_loss(dist.group.WORLD)) * world
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= ns.warmup:
            times.append(time.perf_counter() - t0)
    ce = loss_sum.detach() / n_global
    dist.all_reduce(ce)  # the mean token loss over all ranks (each rank's loss_sum is its share)
    loss_value = ce.item()
    load = model.expert_load_stats(dist.group.WORLD)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    step_s = statistics.median(times)
    del model, opt, hidden, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(system="mirotrain", gpus=world, ep=ep, layers=layers, seq=ns.seq, experts=backend, step_s=step_s,
                tok_s_gpu=ns.seq / step_s, peak_gib=peak, loss=loss_value,
                max_over_mean_load=load["moe/max_over_mean_load"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------- HF


def run_hf_script(layers: int, seq: int, impl: str) -> dict:
    """The shared single-GPU baseline in its own process (it prints one JSON line)."""
    from benchmarks.common import baseline_script

    proc = subprocess.run([sys.executable, str(baseline_script("hf_moe_single_gpu.py")), str(layers), str(seq), impl],
                          capture_output=True, text=True, timeout=420)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(system=f"hf-{impl}", error=(proc.stderr or proc.stdout)[-600:], layers=layers, seq=seq)
    out = json.loads(lines[-1])
    return dict(system="hf transformers", gpus=1, ep=1, layers=layers, seq=seq, experts=impl,
                step_s=seq / out["tok_s"], tok_s_gpu=float(out["tok_s"]), peak_gib=out.get("peak_gib", 0.0),
                loss=out.get("loss"))


def run_hf_tiny_cpu(shape: dict, layers: int, seq: int, impl: str) -> dict:
    """CPU smoke stand-in for the baseline script (same recipe minus CUDA and autocast)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=shape["vocab"], hidden_size=shape["dim"], num_hidden_layers=layers,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         head_dim=shape["head_dim"], intermediate_size=3 * shape["dim"],
                         moe_intermediate_size=shape["moe_hidden"], num_experts=shape["experts"],
                         num_experts_per_tok=shape["top_k"], norm_topk_prob=True, output_router_logits=True,
                         router_aux_loss_coef=0.001, experts_implementation=impl)
    torch.manual_seed(0)
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
    return dict(system="hf transformers", gpus=1, ep=1, layers=layers, seq=seq, experts=impl, step_s=step_s,
                tok_s_gpu=seq / step_s, peak_gib=0.0, loss=out.loss.item())


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
    head = ("system", "GPUs", "EP", "layers", "seq", "experts", "tok/s/GPU", "TFLOP/s", "MFU(meas)", "MFU(989)",
            "tok/s/GPU@48L", "peak GiB", "step s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['system']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        lines.append(" | ".join(str(v) for v in (
            r["system"], r["gpus"], r["ep"], r["layers"], r["seq"], r["experts"], f"{r['tok_s_gpu']:.0f}",
            f"{r['tflops']:.1f}", f"{100 * r['mfu_measured']:.1f}%", f"{100 * r['mfu_nominal']:.1f}%",
            f"{r['tok_s_gpu_48l']:.0f}", f"{r['peak_gib']:.1f}", f"{r['step_s']:.3f}")))
    ours = {(r["layers"], r["experts"]): r for r in rows if r.get("system") == "mirotrain" and "error" not in r}
    for (layers, backend), r in ours.items():
        if backend == "loop" and (layers, "grouped_mm") in ours:
            lines.append(f"\ngrouped_mm vs loop at {layers} layers: "
                         f"{ours[(layers, 'grouped_mm')]['tok_s_gpu'] / r['tok_s_gpu']:.2f}x")
    lines.append(f"matmul peak (measured bf16): {peak_tflops:.0f} TFLOP/s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="auto", help="layers of our EP model ('auto': as many as fit)")
    parser.add_argument("--hf-layers", type=int, default=4, help="layers of the single-GPU HF run (and our same-depth row)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--ep", type=int, default=0, help="expert-parallel size (default: world size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hf-impls", default="grouped_mm", help="comma list of HF experts_implementation values")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 1 CPU process (gloo)")
    ns = parser.parse_args()

    if ns.cpu_smoke:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        device, shape = torch.device("cpu"), TINY
        ns.seq, ns.steps, ns.warmup = min(ns.seq, 128), 2, 1
        peak = 1.0  # MFU is meaningless on CPU; the column only checks the plumbing
    else:
        dist.init_process_group("nccl")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, shape = torch.device("cuda", local), FULL
        from benchmarks.common import matmul_peak_tflops

        peak = matmul_peak_tflops()
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = ns.ep or world
    if ns.layers == "auto":
        layers = TINY["layers"] if ns.cpu_smoke else auto_layers(world, ep, torch.cuda.get_device_properties(device).total_memory, shape)
    else:
        layers = int(ns.layers)
    hf_layers = 1 if ns.cpu_smoke else ns.hf_layers

    # The HF baseline runs first, on rank 0's GPU while the other ranks wait: once our model has run, rank 0's
    # process keeps ~37 GiB (NCCL and compile workspaces) that empty_cache does not hand back, and the 4-layer
    # HF model (fp32 weights + AdamW, ~55 GiB) no longer fits beside it.
    hf_rows = []
    if rank == 0 and not ns.skip_hf:
        for impl in ns.hf_impls.split(","):
            row = run_hf_tiny_cpu(shape, hf_layers, ns.seq, impl) if ns.cpu_smoke else run_hf_script(hf_layers, ns.seq, impl)
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
