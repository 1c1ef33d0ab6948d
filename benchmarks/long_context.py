"""Long-context training with Ulysses SP: how long a row Qwen3-8B (yarn ×4) trains on at SP=4 vs SP=1.

One run, two ladders of sequence lengths, each climbed until the first out-of-memory:
  SP=4 (dp=1: one row shared by the 4 GPUs): 64K, 96K, 128K, 192K, 256K
  SP=1 (dp=4: one row per GPU):              16K, 32K, 48K, 64K, 96K, 128K
Every trial is a full training step as the trainer runs it: FSDP2 over the dp × sp mesh with bf16 compute
(MixedPrecisionPolicy, fp32 master weights, fp32 reduce), full activation checkpointing per layer, the
chunked linear cross-entropy of ``mirotrain.modules.loss`` on each rank's own shard, global-norm clipping,
AdamW. Rows are random tokens packed as documents of at most the model's 131072 positions (rows of 192K
and 256K hold two documents); FLOPs count causal attention per document.

Each trial is its own ``torchrun``: an OOM on one rank cannot leave the others hung in a collective (torchrun
tears the trial down) and the next trial starts on clean GPUs. The table goes to stdout and, with
``--json``, to a file (plus the full log of any failed trial). Peak memory is the max over ranks of
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the timed steps (on CPU: peak RSS).

Usage (4 GPUs; a trial costs ~30 s of start-up plus warmup + timed steps, a 256K step roughly a minute, so
the whole sweep may exceed a 10-minute slot: split it with --only / --seqs, and --budget-s stops starting
new trials after that many seconds):
  python benchmarks/long_context.py [--json $OUT/long_context.json] [--budget-s 540]
  python benchmarks/long_context.py --only sp --seqs 131072,196608,262144   # part of the SP=4 ladder
  python benchmarks/long_context.py --only dp                               # the SP=1 ladder only
  python benchmarks/long_context.py --sp-seqs 131072,262144 --dp-seqs 32768,65536,98304  # shorter ladders
  python benchmarks/long_context.py --cpu-smoke                             # gloo, tiny model, 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SP_LADDER = [65536, 98304, 131072, 196608, 262144]
DP_LADDER = [16384, 32768, 49152, 65536, 98304, 131072]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
MAX_POSITIONS = 131072  # 32768 × 4
OOM_EXIT = 3


# ------------------------------------------------------------------------------------------------ worker
def build_model(tiny: bool, device_type: str):
    """Qwen3-8B instruct with yarn ×4 (or a tiny stand-in for the CPU smoke run), on the meta device."""
    import torch

    from mirotrain.models.qwen3 import qwen3, qwen3_8b_instruct_yarn

    backend = "auto" if device_type == "cuda" else "sdpa"
    with torch.device("meta"):
        if tiny:
            return qwen3(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                         max_seq_len=1024, attention_backend=backend,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
        return qwen3_8b_instruct_yarn(MAX_POSITIONS, YARN, attention_backend=backend)


def make_row(seq: int, max_doc: int, vocab: int, seed: int):
    """A packed row of random tokens: documents of ``max_doc`` tokens (the last one shorter), all trained."""
    import torch

    from mirotrain.data.batch import SFTBatch

    gen = torch.Generator().manual_seed(seed)
    bounds = list(range(0, seq, max_doc)) + [seq]
    cu = torch.tensor(bounds, dtype=torch.int32)
    lens = (cu[1:] - cu[:-1]).tolist()
    return SFTBatch(input_ids=torch.randint(0, vocab, (1, seq), generator=gen),
                    labels=torch.randint(0, vocab, (1, seq), generator=gen),
                    position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                    token_mask=torch.ones((1, seq), dtype=torch.bool), cu_seqlens=cu, max_seqlen=max(lens))


def run_worker(ns: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from mirotrain.modules.loss import LinearCrossEntropyLoss
    from mirotrain.modules.rope import RotaryEmbedding
    from mirotrain.parallel.mesh import ParallelDims
    from mirotrain.parallel.ulysses import apply_ulysses, shard_batch_for_sp
    from mirotrain.training.grad_clip import clip_grad_norm_
    from mirotrain.training.metrics import matmul_params, peak_memory, reset_peak_memory, step_flops

    cuda = ns.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dims = ParallelDims(world, sp=ns.sp)
    model = build_model(ns.tiny, ns.device)
    args = model.args
    dims.validate_model(args.n_heads, args.n_kv_heads, args.attention_backend, ns.device)  # before GPU work
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    meshes = dims.build_mesh(ns.device)

    # Order: SP exchange (swaps attn_fn), activation checkpointing, then FSDP (layers, then the root).
    apply_ulysses(model, meshes.sp_group, device_type=ns.device)
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer)
    loss_fn = LinearCrossEntropyLoss()

    class LossStep(nn.Module):
        """Root FSDP unit: the LM head weight is unsharded for the whole forward, loss included."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.inner.forward_hidden(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                                               batch["max_seqlen"])
            return loss_fn(hidden, self.inner.lm_head_weight, batch["labels_cpu"])

    step_module = LossStep(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=meshes.fsdp, mp_policy=mp)
    fully_shard(step_module, mesh=meshes.fsdp, mp_policy=mp)
    step_module.to_empty(device=device)
    with torch.no_grad():  # random init of the local shards: matrices N(0, 0.02), norm weights 1
        gen = torch.Generator(device=device).manual_seed(rank)
        for p in step_module.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if p.dim() == 1:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=gen)
        for m in step_module.modules():
            if isinstance(m, RotaryEmbedding):
                m.reset_parameters()
    optim = torch.optim.AdamW(step_module.parameters(), lr=1e-5, fused=cuda, foreach=not cuda)

    # Ranks of one SP group build the same row (seeded by dp rank) and keep their columns of it.
    row = make_row(ns.seq, min(ns.seq, args.max_seq_len), args.vocab_size, seed=meshes.dp_rank)
    local = shard_batch_for_sp(row.token_fields(), meshes.sp_rank, dims.sp, pad_id=0)
    batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in local.items()}
    batch["labels_cpu"] = local["labels"]  # the loss selects trained tokens on the host: no device sync
    # N: trained tokens over every rank (SP ranks hold disjoint ones); the loss is loss_sum * world / N, as the
    # trainer's step scales it for FSDP's average over the world
    n_tokens = (local["labels"] != -100).sum().to(device, torch.float64)
    dist.all_reduce(n_tokens, group=meshes.fsdp_group)
    grad_scale = (world / n_tokens.clamp(min=1)).float()
    flops_per_gpu = step_flops(args, matmul_params(args), row) * dims.dp / world

    def train_step() -> None:
        if ns.fake_oom_above and ns.seq > ns.fake_oom_above and rank == world - 1:
            raise torch.OutOfMemoryError(f"simulated OOM above {ns.fake_oom_above} tokens (--cpu-smoke)")
        loss_sum, _ = step_module(batch)
        (loss_sum * grad_scale).backward()
        clip_grad_norm_(step_module.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(ns.warmup):
        train_step()
    sync()
    reset_peak_memory(device)  # steady state: optimizer states exist, first-step transients excluded
    start = time.perf_counter()
    for _ in range(ns.steps):
        train_step()
    sync()
    step_s = (time.perf_counter() - start) / ns.steps

    mem = peak_memory(device)
    mem_t = torch.tensor([mem.get("peak_mem_alloc_gib", mem.get("peak_rss_gib", 0.0)),
                          mem.get("peak_mem_reserved_gib", 0.0)], device=device)
    dist.all_reduce(mem_t, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = dict(status="ok", sp=dims.sp, dp=dims.dp, seq=ns.seq, docs=len(row.cu_seqlens) - 1,
                      step_s=step_s, tokens_per_s_per_gpu=ns.seq * dims.dp / (step_s * world),
                      tflops_per_gpu=flops_per_gpu / step_s / 1e12, peak_alloc_gib=float(mem_t[0]),
                      peak_reserved_gib=float(mem_t[1]), n_tokens=int(n_tokens))
        Path(f"{ns.out}.rank0").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_worker_reporting_oom(ns: argparse.Namespace) -> None:
    """Run a trial; an OOM anywhere leaves a marker for the driver and exits without NCCL teardown (peers
    may be blocked in a collective; torchrun terminates them once this process is gone)."""
    import torch

    try:
        run_worker(ns)
    except torch.OutOfMemoryError as err:
        rank = os.environ.get("RANK", "0")
        print(f"[rank {rank}] OOM at seq {ns.seq}: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        Path(f"{ns.out}.rank{rank}").write_text(json.dumps({"status": "oom"}))
        sys.stderr.flush()
        os._exit(OOM_EXIT)


# ------------------------------------------------------------------------------------------------ driver
def run_trial(ns: argparse.Namespace, sp: int, seq: int, timeout_s: float) -> dict:
    """One torchrun for (sp, seq); returns rank 0's result, or status oom / error / timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ns.nproc}",
               str(Path(__file__).resolve()), "--worker", f"--sp={sp}", f"--seq={seq}", f"--steps={ns.steps}",
               f"--warmup={ns.warmup}", f"--device={ns.device}", f"--out={out}",
               f"--fake-oom-above={ns.fake_oom_above}"] + (["--tiny"] if ns.tiny else [])
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", OMP_NUM_THREADS="1",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        started = time.perf_counter()
        # Own session, so a timeout can kill torchrun *and* its workers (which hold the GPUs).
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return dict(status="timeout", sp=sp, seq=seq)
        results = {p.name: json.loads(p.read_text()) for p in Path(tmp).glob("result.rank*")}
        wall = time.perf_counter() - started
        if any(r.get("status") == "oom" for r in results.values()) or "OutOfMemoryError" in stderr:
            return dict(status="oom", sp=sp, seq=seq, wall_s=wall)
        if results.get("result.rank0", {}).get("status") == "ok":
            # Written after the timed steps: a crash in process teardown does not void the measurement.
            return dict(results["result.rank0"], wall_s=wall, **({"exit_rc": proc.returncode} if proc.returncode else {}))
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        tail = "\n".join(lines[-40:])
        if ns.json:  # the whole log of a failed trial, beside the results
            Path(f"{ns.json}.sp{sp}_seq{seq}.stderr").write_text(stderr)
        return dict(status="error", sp=sp, seq=seq, wall_s=wall, rc=proc.returncode, stderr_tail=tail)


def format_table(rows: list[dict]) -> str:
    head = ("| SP | DP | seq len | docs | status | step s | tokens/s/GPU | TFLOP/s/GPU | peak alloc GiB | "
            "peak reserved GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['sp']} | {r['dp']} | {r['seq']} | {r['docs']} | ok | {r['step_s']:.2f} | "
                         f"{r['tokens_per_s_per_gpu']:.0f} | {r['tflops_per_gpu']:.1f} | {r['peak_alloc_gib']:.1f} | "
                         f"{r['peak_reserved_gib']:.1f} |")
        else:
            lines.append(f"| {r['sp']} | | {r['seq']} | | {r['status']} | | | | | |")
    for sp in sorted({r["sp"] for r in rows}, reverse=True):
        ok = [r["seq"] for r in rows if r["sp"] == sp and r["status"] == "ok"]
        failed = [f"{r['status']} at {r['seq']}" for r in rows if r["sp"] == sp and r["status"] != "ok"]
        lines.append(f"\nSP={sp}: largest sequence reached {max(ok) if ok else 'none'}"
                     + (f" ({failed[0]})" if failed else " (no OOM within the ladder)"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo, tiny model, 2 CPU processes")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--sp", type=int, default=4, help="SP degree of the long ladder")
    parser.add_argument("--only", choices=["sp", "dp"], help="run only the SP ladder or only the SP=1 ladder")
    parser.add_argument("--seqs", help="comma-separated lengths replacing both ladders")
    parser.add_argument("--sp-seqs", help="comma-separated lengths replacing the SP ladder")
    parser.add_argument("--dp-seqs", help="comma-separated lengths replacing the SP=1 ladder")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per trial")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trial-timeout-s", type=float, default=900)
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting trials after this long")
    parser.add_argument("--json", help="also write the results here")
    # worker-only
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--fake-oom-above", type=int, default=0, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        run_worker_reporting_oom(ns)
        return

    sp_ladder, dp_ladder = SP_LADDER, DP_LADDER
    if ns.cpu_smoke:
        ns.nproc, ns.sp, ns.device, ns.tiny, ns.steps = 2, 2, "cpu", True, 2
        # 509 exercises the padding segment, 2048 two documents (the tiny model has 1024 positions); the 4096
        # trial "runs out of memory" on one rank, which exercises the OOM teardown and the end of the ladder.
        ns.fake_oom_above = 2048
        sp_ladder, dp_ladder = [256, 509, 2048, 4096], [256, 512]
    if ns.seqs:
        sp_ladder = dp_ladder = [int(s) for s in ns.seqs.split(",")]
    if ns.sp_seqs:
        sp_ladder = [int(s) for s in ns.sp_seqs.split(",")]
    if ns.dp_seqs:
        dp_ladder = [int(s) for s in ns.dp_seqs.split(",")]
    ladders = [(ns.sp, sp_ladder), (1, dp_ladder)]
    if ns.only:
        ladders = ladders[:1] if ns.only == "sp" else ladders[1:]

    started, rows = time.perf_counter(), []
    for sp, ladder in ladders:
        for seq in ladder:
            if ns.budget_s is not None and time.perf_counter() - started > ns.budget_s:
                print(f"budget of {ns.budget_s:.0f}s spent: skipping SP={sp} seq={seq}", flush=True)
                break
            result = run_trial(ns, sp, seq, ns.trial_timeout_s)
            rows.append(result)
            print(json.dumps(result), flush=True)
            if ns.json:  # after every trial, so a run stopped by its time limit still leaves its rows
                Path(ns.json).write_text(json.dumps({"rows": rows}, indent=1))
            if result["status"] != "ok":
                break  # the first failure ends this ladder
    table = format_table(rows)
    print(table)
    if ns.json:
        Path(ns.json).write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
