"""SFT throughput: our trainer against the HF transformers baseline, in the same run on the same GPUs.

Ours runs through the real ``SFTTrainer`` (FSDP2 per layer + root, bf16 compute with fp32 master weights and
fp32 reduction, activation checkpointing, torch.compile'd layers and loss kernel, fused AdamW, global-norm
clipping) from random weights on synthetic packed rows of ``--seq`` tokens; by default each row is one
document, which is what the baselines train on (``--docs N`` packs N documents per row instead). The
baseline is ../shared/baselines/hf_single_gpu.py (1 GPU) or hf_fsdp2.py (several GPUs), with Liger when
liger-kernel is installed. Reported side by side: median step time, tokens/s/GPU, causal MFU against the
bf16 matmul rate measured on this GPU (the baselines' denominator), peak memory.

Usage (GPU machine; carry ../shared/baselines as .baselines):
  python benchmarks/sft.py --size 1.7B --seq 16384 --nproc 1
  python benchmarks/sft.py --size 8B --seq 16384 --nproc 4 [--json $OUT/sft_8b.json]
  python benchmarks/sft.py --size 1.7B --loss liger          # Liger fused CE instead of our chunked CE
  python benchmarks/sft.py --size 8B --nproc 4 --mix-mean 3072   # packed log-normal mix (varlen), ours only
  python benchmarks/sft.py --size 8B --seq 16384 --nproc 2 --fp8 tensorwise   # FP8 Linears (rowwise too)
  python benchmarks/sft.py --cpu-smoke                       # tiny model, gloo, 2 processes: the plumbing only

With ``--fp8`` the MFU column stays against the measured bf16 matmul rate (the baselines' denominator): it is
the bf16-equivalent MFU, which FP8 matmuls can push past what bf16 reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirotrain.config.schema import FP8_RECIPES  # noqa: E402  (after the path to the repository)

BUILDERS = {"0.6B": "qwen3_0_6b_instruct", "1.7B": "qwen3_1_7b_instruct", "4B": "qwen3_4b_instruct",
            "8B": "qwen3_8b_instruct", "14B": "qwen3_14b_instruct", "32B": "qwen3_32b"}


def doc_lengths(rng, seq: int, docs: int, mix_mean: int):
    """Document lengths filling one row of ``seq`` tokens.

    ``mix_mean`` > 0: log-normal lengths (sigma 1, mean ``mix_mean``, clipped to [64, seq]) drawn until the
    row is full, the last one cut to fit: the realistic mix of short and long agent traces. Otherwise ``docs``
    equal documents.
    """
    import numpy as np

    if mix_mean <= 0:
        lens = np.full(docs, seq // docs, dtype=np.int64)
        lens[-1] += seq - lens.sum()
        return lens
    mu = np.log(mix_mean) - 0.5  # mean of a log-normal is exp(mu + sigma^2 / 2)
    lens, left = [], seq
    while left > 0:
        n = int(min(max(rng.lognormal(mu, 1.0), 64), seq, left))
        lens.append(n)
        left -= n
    return np.asarray(lens, dtype=np.int64)


def write_rows(out_dir: Path, n_rows: int, seq: int, docs: int, vocab: int, seed: int = 0, mix_mean: int = 0) -> str:
    """Packed rows of random tokens (see ``doc_lengths``; first quarter of each document untrained)."""
    import numpy as np

    from mirotrain.data.packing import SFT_COLUMNS
    from mirotrain.data.shards import write_rows as write

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        lens = doc_lengths(rng, seq, docs, mix_mean)
        ids, labels, pos = [], [], []
        for n in lens:
            doc = rng.integers(0, vocab, size=n + 1)
            lab = doc[1:].copy()
            lab[: n // 4] = -100
            ids.append(doc[:-1]), labels.append(lab), pos.append(np.arange(n))
        rows.append({"input_ids": np.concatenate(ids).astype(np.int32), "labels": np.concatenate(labels).astype(np.int32),
                     "position_ids": np.concatenate(pos).astype(np.int32), "seq_lens": lens.astype(np.int32),
                     "doc_index": np.arange(len(lens), dtype=np.int64)})
    manifest = {"kind": "sft", "layout": "packed", "pad_id": 0, "packed_seq_len": seq, "vocab_size": vocab}
    write(str(out_dir), rows, SFT_COLUMNS, manifest)
    return str(out_dir)


def base_config(ns: argparse.Namespace, work: Path, shard_dir: str) -> dict:
    from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir

    if ns.cpu_smoke:
        model = {"_component_": "mirotrain.models.qwen3.qwen3", "vocab_size": 512, "dim": 64, "n_layers": 2,
                 "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_dim": 128, "max_seq_len": 4096}
    else:
        model = {"_component_": f"mirotrain.models.qwen3.{BUILDERS[ns.size]}"}
    loss = ("mirotrain.modules.loss.LigerLinearCrossEntropyLoss" if ns.loss == "liger"
            else "mirotrain.modules.loss.LinearCrossEntropyLoss")
    return {
        "output_dir": str(work / "run"), "device": "cpu" if ns.cpu_smoke else "cuda",
        "dtype": "fp32" if ns.cpu_smoke else "bf16", "seed": 0, "model": model,
        "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto",
                      "path": ns.tokenizer or str(bundled_tokenizer_dir())},
        "dataset": {"shard_dir": shard_dir}, "shuffle": False, "batch_size": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-5, "weight_decay": 0.01},
        "loss": {"_component_": loss}, "loss_chunk_tokens": ns.chunk, "clip_grad_norm": 1.0,
        "compile": not ns.cpu_smoke and not ns.no_compile, "enable_activation_checkpointing": True,
        "ac_mode": ns.ac, "ac_option": (int(ns.ac_option) if str(ns.ac_option).isdigit() else ns.ac_option) if ns.ac == "selective" else None,
        "auto_resume": False, "log_every_n_steps": 1000, "log_peak_memory_stats": False,
        "ulysses_sequence_parallel_size": ns.sp, "master_weights": ns.master_weights,
        **({"enable_fp8_training": True, "fp8_recipe_name": ns.fp8} if ns.fp8 else {}),
        **({"memory_budget_gib": ns.memory_budget_gib} if ns.memory_budget_gib else {}),
    }


def time_steps(trainer, warmup: int, steps: int, peak_over_warmup: bool = False) -> dict:
    """Median optimizer-step time (slowest rank) after ``warmup`` steps; rates from the trainer's own counts.
    Peak memory covers the timed steps, or every step with ``peak_over_warmup``."""
    import torch
    import torch.distributed as dist

    dev = trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    trainer.train_loader.set_epoch(0)
    it = iter(trainer.train_loader)
    times, tokens, flops = [], [], []
    for i in range(warmup + steps):
        if i == (0 if peak_over_warmup else warmup) and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batches = trainer._micro_batches(it)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        result = trainer.train_step(batches)
        sync()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        if i >= warmup:
            times.append(float(t)), tokens.append(result.tokens), flops.append(result.flops)
    med = statistics.median(times)
    loss_sum = result.loss_sum.detach().clone()
    dist.all_reduce(loss_sum, group=trainer.loss_group)  # every rank's share (an SP rank may hold only a prompt)
    out = {"step_s": med, "tokens_per_step_per_gpu": statistics.mean(tokens),
           "tokens_per_s_per_gpu": statistics.mean(tokens) / med,
           "flops_per_step_per_gpu": statistics.mean(flops),
           "loss": float(loss_sum) / max(float(result.n_targets), 1.0)}
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_worker(ns: argparse.Namespace) -> None:
    import torch.distributed as dist

    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.sft import SFTTrainer

    work = Path(ns.work)
    t0 = time.perf_counter()
    trainer = SFTTrainer(base_config(ns, work, json.loads((work / "shards.json").read_text())["sft"]))
    result = {"setup_s": time.perf_counter() - t0, **time_steps(trainer, ns.warmup, ns.steps)}
    trainer.close()
    if not ns.cpu_smoke:
        from benchmarks.common import matmul_peak_tflops

        peak = matmul_peak_tflops()
        result["matmul_peak_tflops"] = peak
        result["tflops_per_gpu"] = result["flops_per_step_per_gpu"] / result["step_s"] / 1e12
        result["mfu"] = result["tflops_per_gpu"] / peak
    if dist.get_rank() == 0:
        (work / "result_ours.json").write_text(json.dumps(result, indent=2))
    destroy_distributed()


def hf_baseline(ns: argparse.Namespace) -> dict | None:
    """The HF baseline on the same GPUs (JSON line it prints), or None if it failed (its output is shown)."""
    import importlib.util

    from benchmarks.common import baseline_script

    liger = "1" if importlib.util.find_spec("liger_kernel") is not None else "0"
    if ns.nproc == 1:
        cmd = [sys.executable, str(baseline_script("hf_single_gpu.py")), f"{ns.size}:{ns.seq}:{liger}"]
    else:
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={ns.nproc}", str(baseline_script("hf_fsdp2.py")),
               ns.size, str(ns.seq), liger]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"case"' in line:
            return {"liger": liger == "1", **json.loads(line)}
    print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
    return None


def add_trainer_args(p: argparse.ArgumentParser) -> None:
    """The flags ``base_config`` reads (the trainer's layout, loss, recompute, precision and FP8), shared with
    benchmarks/profile_sft.py so a profile runs exactly the config a benchmark row ran."""
    p.add_argument("--size", default="1.7B", choices=sorted(BUILDERS))
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--docs", type=int, default=1, help="documents per packed row (baselines train on 1)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel size")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per LM-head chunk (loss_chunk_tokens)")
    p.add_argument("--loss", choices=("chunked", "liger"), default="chunked")
    p.add_argument("--ac", choices=("full", "selective", "auto"), default="full",
                   help="auto: per layer no recompute, selective or full, by the memory estimate (ac_mode: auto)")
    p.add_argument("--memory-budget-gib", type=float,
                   help="with --ac auto: plan for this many GiB per GPU (memory_budget_gib), e.g. the HF peak")
    p.add_argument("--master-weights", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the 10-byte bf16 memory mode, which leaves room to recompute less")
    p.add_argument("--ac-option", default="op", help="selective AC: op | attention | N (every N-th layer)")
    p.add_argument("--fp8", nargs="?", const="tensorwise", choices=FP8_RECIPES,
                   help="FP8 Linears in the decoder layers with this recipe (enable_fp8_training; default tensorwise)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tokenizer", help="Qwen3 tokenizer directory (default: bundled)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags; tests/gpu builds its runs' configs from them, so a new flag reaches both."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trainer_args(p)
    p.add_argument("--mix-mean", type=int, default=0,
                   help="pack log-normal document lengths of this mean instead (P1's realistic case; no baseline)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.fp8 and ns.cpu_smoke:
        p.error("--fp8 needs a GPU with float8 matmuls; --cpu-smoke runs on the CPU")
    return ns


def main() -> None:
    ns = parse_args()
    if ns.cpu_smoke:
        ns.nproc, ns.seq, ns.steps, ns.warmup, ns.chunk, ns.no_baseline = 2, min(ns.seq, 256), 2, 1, 128, True
    if ns.worker:
        run_worker(ns)
        return

    work = Path(tempfile.mkdtemp(prefix="mirotrain-sft-bench-"))
    dp = ns.nproc // ns.sp
    if ns.mix_mean:
        ns.no_baseline = True  # the HF baseline trains on one document per row only
    shard = write_rows(work / "shards", dp * (ns.steps + ns.warmup), ns.seq, ns.docs, 512 if ns.cpu_smoke else 151936,
                       mix_mean=ns.mix_mean)
    (work / "shards.json").write_text(json.dumps({"sft": shard}))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    forwarded = ["--size", ns.size, "--seq", str(ns.seq), "--steps", str(ns.steps), "--warmup", str(ns.warmup),
                 "--chunk", str(ns.chunk), "--loss", ns.loss, "--ac", ns.ac, "--ac-option", ns.ac_option,
                 "--sp", str(ns.sp), "--master-weights", ns.master_weights]
    forwarded += (["--cpu-smoke"] if ns.cpu_smoke else []) + (["--no-compile"] if ns.no_compile else []) + \
        (["--tokenizer", ns.tokenizer] if ns.tokenizer else []) + (["--fp8", ns.fp8] if ns.fp8 else []) + \
        (["--memory-budget-gib", str(ns.memory_budget_gib)] if ns.memory_budget_gib else [])
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={ns.nproc}", str(Path(__file__).resolve()), "--worker",
           "--work", str(work), *forwarded]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    results = {"ours": json.loads((work / "result_ours.json").read_text()),
               "config": {"size": "tiny" if ns.cpu_smoke else ns.size, "seq": ns.seq, "docs": ns.docs, "mix_mean": ns.mix_mean,
                          "nproc": ns.nproc, "sp": ns.sp, "loss": ns.loss, "ac": ns.ac, "compile": not ns.no_compile,
                          "fp8": ns.fp8}}
    if not ns.no_baseline:
        results["hf"] = hf_baseline(ns)
    print(f"\n{'run':<22} {'step s':>8} {'tok/s/GPU':>11} {'MFU':>7} {'peak GiB':>9}")
    ours = results["ours"]
    label = f"mirotrain fp8 {ns.fp8}" if ns.fp8 else "mirotrain"
    print(f"{label:<22} {ours['step_s']:>8.3f} {ours['tokens_per_s_per_gpu']:>11.0f} "
          f"{ours.get('mfu', float('nan')):>7.3f} {ours.get('peak_mem_gib', float('nan')):>9.1f}")
    hf = results.get("hf")
    if hf:
        # Same causal FLOP count per token as ours (the rows are single documents of the same length), against
        # the same measured matmul peak, so the two MFU columns compare like for like.
        tok_s = float(hf.get("tok_s_gpu", hf.get("tok_s", float("nan"))))
        flops_per_token = ours["flops_per_step_per_gpu"] / (ours["tokens_per_s_per_gpu"] * ours["step_s"])
        hf["causal_mfu_same_formula"] = tok_s * flops_per_token / (ours["matmul_peak_tflops"] * 1e12)
        print(f"{hf.get('case', 'hf'):<22} {ns.seq / tok_s:>8.3f} {tok_s:>11.0f} {hf['causal_mfu_same_formula']:>7.3f} "
              f"{float(hf.get('peak_gib', float('nan'))):>9.1f}")
        hf["ours_over_hf"] = ours["tokens_per_s_per_gpu"] / tok_s
        print(f"ours / HF: {hf['ours_over_hf']:.2f}x tokens/s/GPU")
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
