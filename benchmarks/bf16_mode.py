"""bf16 memory mode (#18): one model trained three times with the same seed and data, once per ``master_weights``
mode (fp32 masters, bf16 with compensated updates, bf16 rounded to nearest as MiroTrain did), compared step by
step.

Each mode runs the real ``SFTTrainer`` under torchrun (FSDP2, bf16 compute, torch.compile'd layers, chunked
CE) on Qwen3-0.6B shapes from the same random init, over the demo agent traces (mirotrain/data/demo.py) packed
once into rows of ``--seq`` tokens, with MiroThinker's SFT settings (lr 4e-5, weight decay 0.1, 10% warm-up,
cosine, clip 1.0). Every mode starts from the same bf16 weights (``--init bf16``, the default): a random init
written once as an HF checkpoint in bf16 and loaded as a fine-tuning run loads its base model, so no mode
holds more of the initial weights than another. ``--init fp32`` draws the random init in each run instead: the
fp32-master run then keeps 16 more bits of every initial weight than the bf16 modes can hold, and its weights
start moving in compute with the first updates, while the bf16 modes' stay put until an update reaches half a
bf16 ulp. ``--init-control`` adds that run (``fp32_from_fp32_init``) beside the others. Printed per mode: the loss at steps 50/100/200/300 and at the end, the largest relative
deviation from the fp32-master loss from step 50 on (per step, and of 10-step means), bytes per parameter
counted from the parameters and optimizer state after training, median tokens/s/GPU and peak memory.

``--fp8 RECIPE ...`` adds one run per FP8 recipe (``fp8_<recipe>``: fp32 masters, the decoder layers' Linears in
float8, mirotrain/parallel/float8.py) to compare against the fp32-master run, whose matmuls are bf16 (issue 20:
the FP8 loss within 1% of bf16 from step 50 to 300); ``--modes fp32`` leaves the bf16 modes out.

Usage (GPU machine; ~5 minutes on 2x H200):
  python benchmarks/bf16_mode.py [--json $OUT/bf16_mode.json]
  python benchmarks/bf16_mode.py --modes fp32 --fp8 tensorwise rowwise --control   # FP8 vs bf16 matmuls
  python benchmarks/bf16_mode.py --cpu-smoke          # tiny model, 3 steps per mode, gloo, 2 processes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirotrain.config.schema import FP8_RECIPES  # noqa: E402  (after the path to the repository)

MODES = ("fp32", "bf16", "bf16_plain")
REPORT_STEPS = (50, 100, 200, 300)
DEVIATION_FROM = 50
WARMUP_STEPS = 10  # steps left out of the throughput median (compilation, allocator warm-up)
MEAN_TOKENS_PER_TRACE = 1500  # demo traces average ~1,700 Qwen3 tokens: a little more data than the steps need


def base_config(ns: argparse.Namespace, work: Path) -> dict:
    """The run's config without its mode (see the module docstring)."""
    if ns.cpu_smoke:
        model = {"_component_": "mirotrain.models.qwen3.qwen3", "vocab_size": 151936, "dim": 32, "n_layers": 2,
                 "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "hidden_dim": 64, "max_seq_len": 4096,
                 "tie_word_embeddings": True}
    else:
        model = {"_component_": "mirotrain.models.qwen3.qwen3_0_6b_instruct"}
    return {
        "output_dir": str(work / "run"), "device": "cpu" if ns.cpu_smoke else "cuda", "dtype": "bf16", "seed": 0,
        "model": model,
        "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "path": None,
                      "max_seq_len": ns.seq},
        "dataset": {"_component_": "mirotrain.datasets.odr_chat_dataset", "source": "json",
                    "data_files": str(work / "data" / "sft.jsonl"), "conversation_column": "messages",
                    "conversation_style": "traces", "masking_strategy": "train_on_assistant", "packed": True,
                    "packed_seq_len": ns.seq, "num_workers": 0 if ns.cpu_smoke else None,
                    "output_dir": str(work / "packed")},
        "shuffle": True, "batch_size": 1, "epochs": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": ns.lr, "weight_decay": 0.1},
        "lr_scheduler": {"_component_": "mirotrain.training.get_cosine_schedule_with_warmup", "warmup_ratio": 0.1,
                         "min_lr_ratio": 0.0},
        "clip_grad_norm": 1.0, "compile": not ns.cpu_smoke and not ns.no_compile,
        "enable_activation_checkpointing": False, "auto_resume": False, "save_hf_every_epoch": False,
        "log_every_n_steps": 1, "log_peak_memory_stats": not ns.cpu_smoke,
    }


def prepare(ns: argparse.Namespace, work: Path) -> dict:
    """Demo traces, packed once; the epochs and step cap that give exactly ``ns.steps`` optimizer steps."""
    from mirotrain.config.tree import parse_config
    from mirotrain.data.demo import write_demo
    from mirotrain.data.pack_shards import pack_dataset, read_manifest

    traces = max(8, math.ceil(ns.steps * ns.nproc * ns.seq / MEAN_TOKENS_PER_TRACE))
    write_demo(str(work / "data"), num_samples=traces, seed=0, num_pairs=1)
    cfg = base_config(ns, work)
    if ns.init == "bf16":
        cfg["checkpointer"] = {"_component_": "torchtune.training.FullModelHFCheckpointer", "model_type": "QWEN3",
                               "checkpoint_dir": write_base_checkpoint(cfg, work / "base")}
    shard_dir = pack_dataset(parse_config(cfg, world_size=ns.nproc, scope=("tokenizer", "dataset")))
    rows = int(read_manifest(shard_dir)["rows"])
    steps_per_epoch = rows // ns.nproc
    epochs = math.ceil(ns.steps / steps_per_epoch)
    cfg.update(epochs=epochs, max_steps_per_epoch=math.ceil(ns.steps / epochs))
    cfg["dataset"] = {**cfg["dataset"], "shard_dir": shard_dir}
    print(f"data: {traces} demo traces -> {rows} rows of {ns.seq} tokens; {epochs} epoch(s) of "
          f"{cfg['max_steps_per_epoch']} steps on {ns.nproc} ranks", flush=True)
    return cfg


def write_base_checkpoint(cfg: dict, out: Path) -> str:
    """The engine's random init of the run's model (seed ``cfg['seed']``, drawn on the run's device) written as
    a bf16 HF checkpoint in ``out``, with the bundled tokenizer (the export copies it from the base checkpoint):
    every mode then starts from the same bf16 weights."""
    import torch

    from mirotrain.models.hf_weights import save_pretrained
    from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir
    from mirotrain.training.builders import build_meta_model

    model = build_meta_model(cfg["model"], "sdpa")
    device = torch.device(cfg["device"])
    model.to_empty(device=device)
    model.rope.reset_parameters()
    model.init_weights(seed=cfg["seed"], device=device)
    save_pretrained(model, out, tokenizer_dir=bundled_tokenizer_dir(), dtype=torch.bfloat16, is_writer=True)
    del model
    return str(out)


def run_worker(ns: argparse.Namespace) -> None:
    """One mode under torchrun: train, then count the bytes per parameter and the peak memory (rank 0 writes)."""
    import torch
    import torch.distributed as dist

    from mirotrain.optim.precision import measured_bytes_per_param
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.sft import SFTTrainer

    cfg = json.loads(Path(ns.worker_config).read_text())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(cfg)
    summary = trainer.train()
    result = {"bytes_per_param": measured_bytes_per_param(trainer.model, trainer.optimizer),
              "steps": summary["steps"], "wall_s": summary["wall_time_s"]}
    if torch.cuda.is_available():
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if dist.get_rank() == 0:
        Path(cfg["output_dir"], "bench_result.json").write_text(json.dumps(result))
    destroy_distributed()


def run_mode(ns: argparse.Namespace, work: Path, cfg: dict, label: str, mode: str, **keys: object) -> dict:
    """Train ``mode`` (with the further config ``keys``) under torchrun in ``work/label``; its per-step losses and
    rates (metrics.jsonl) and the worker's counts."""
    out = work / label
    cfg = {**cfg, "output_dir": str(out), "master_weights": mode, **keys}
    path = work / f"{label}.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={ns.nproc}", str(Path(__file__).resolve()),
           "--worker-config", str(path)]
    print(f"--- {label}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {m["step"]: m for m in metrics if "loss" in m}
    rates = [steps[s]["tokens_per_sec_per_gpu"] for s in sorted(steps) if s > min(WARMUP_STEPS, len(steps) - 1)]
    return {"losses": {s: steps[s]["loss"] for s in sorted(steps)}, "tokens_per_sec_per_gpu": statistics.median(rates),
            **json.loads((out / "bench_result.json").read_text())}


def deviations(losses: dict[int, float], reference: dict[int, float]) -> dict[str, float]:
    """Largest |loss / fp32-master loss - 1| from step ``DEVIATION_FROM`` on: per step, and of 10-step means
    (the same rows in every mode, so the data's step-to-step noise is shared)."""
    steps = [s for s in sorted(reference) if s >= min(DEVIATION_FROM, max(reference))]
    per_step = max(abs(losses[s] / reference[s] - 1) for s in steps)
    windows = [steps[i:i + 10] for i in range(0, len(steps), 10)]
    windowed = max(abs(sum(losses[s] for s in w) / sum(reference[s] for s in w) - 1) for w in windows)
    return {"max_rel_dev": per_step, "max_rel_dev_10_step_mean": windowed}


def report(results: dict[str, dict]) -> None:
    reference = results["fp32"]["losses"]
    last = max(reference)
    shown = [s for s in REPORT_STEPS if s < last] + [last]
    width = max(len(mode) for mode in results) + 2
    print("\n" + f"{'mode':<{width}}" + "".join(f"{f'loss@{s}':>12}" for s in shown)
          + f"{'max dev':>10}{'dev 10-mean':>13}{'bytes/param':>13}{'tok/s/GPU':>11}{'peak GiB':>10}")
    for mode, r in results.items():
        dev = deviations(r["losses"], reference) if mode != "fp32" else {}
        r.update(dev)
        print(f"{mode:<{width}}" + "".join(f"{r['losses'][s]:>12.4f}" for s in shown)
              + f"{dev.get('max_rel_dev', 0):>10.2%}{dev.get('max_rel_dev_10_step_mean', 0):>13.2%}"
              + f"{r['bytes_per_param']:>13.2f}{r['tokens_per_sec_per_gpu']:>11.0f}"
              + f"{r.get('peak_mem_gib', float('nan')):>10.1f}")
    print("final losses: " + ", ".join(f"{m} {r['losses'][last]:.4f}" for m, r in results.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags, checked; tests/gpu builds its runs through them too, so a new flag reaches both."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seq", type=int, default=8192, help="tokens per packed row (one row per GPU per step)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=4e-5)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--control", action="store_true",
                   help="run fp32 a second time (fp32_rerun): GPU runs are not bitwise reproducible, so the two fp32 "
                        "runs' deviation is the floor every mode's deviation is read against")
    p.add_argument("--init", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: every mode loads one bf16 checkpoint of the random init (as fine-tuning does); fp32: "
                        "each run draws the random init itself (the fp32-master run keeps it in fp32)")
    p.add_argument("--init-control", action="store_true",
                   help="with --init bf16, also run fp32 masters from the fp32 random init (fp32_from_fp32_init)")
    p.add_argument("--fp8", nargs="+", default=[], choices=FP8_RECIPES, metavar="RECIPE",
                   help=f"also run fp32 masters with FP8 Linears, one run per recipe ({', '.join(FP8_RECIPES)})")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--work", help="working directory (default: a new temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker_config:
        return ns
    if ns.cpu_smoke:
        ns.nproc, ns.seq, ns.steps = 2, 256, 3
    if "fp32" not in ns.modes:
        p.error("--modes must include fp32 (the reference)")
    if ns.fp8 and ns.cpu_smoke:
        p.error("--fp8 needs a GPU with float8 matmuls; --cpu-smoke runs on the CPU")
    return ns


def main() -> None:
    ns = parse_args()
    if ns.worker_config:
        run_worker(ns)
        return
    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="mirotrain-bf16-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = prepare(ns, work)
    runs = [(mode, mode) for mode in ns.modes] + ([("fp32_rerun", "fp32")] if ns.control else [])
    results = {label: run_mode(ns, work, cfg, label, mode) for label, mode in runs}
    for recipe in ns.fp8:
        results[f"fp8_{recipe}"] = run_mode(ns, work, cfg, f"fp8_{recipe}", "fp32", enable_fp8_training=True,
                                            fp8_recipe_name=recipe)
    if ns.init_control and ns.init == "bf16":
        fp32_init = {k: v for k, v in cfg.items() if k != "checkpointer"}
        results["fp32_from_fp32_init"] = run_mode(ns, work, fp32_init, "fp32_from_fp32_init", "fp32")
    report(results)
    if ns.json:
        Path(ns.json).write_text(json.dumps({"config": {k: v for k, v in vars(ns).items() if k != "worker_config"},
                                             "results": results}, indent=2))


if __name__ == "__main__":
    main()
