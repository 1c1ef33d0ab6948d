"""How long a training step is blocked by a step checkpoint: asynchronous vs synchronous save, same state.

Runs the real ``SFTTrainer`` (Qwen3-8B by default, 4 GPUs, packed 16K rows, random weights) under torchrun and,
in one job: times plain steps (after the first one, the host buffers are allocated in the background, as the
trainer does); then steps followed by an asynchronous save (``StepCheckpointer`` with pinned-memory staging:
the step is blocked for the device-to-host copy only, the write runs in a background thread); then a
synchronous save of the same state. Each save's figures are printed (flushed) as soon as they are measured.
Where the node's host memory cannot hold the staging buffers besides the checkpoint files (a ``--dir`` on
tmpfs: ``mirotrain/checkpoint/host_memory.py``), the trainer saves synchronously and so does the "async" loop:
the result says which (``save_mode``). Reported (slowest rank): median plain step, blocked seconds of the first
async save and the median of the later ones (time in ``save()``, which returns once the state is copied to
host memory), time until the async save is persisted (COMPLETE written), blocked seconds of the synchronous
save, checkpoint size.
Target: ≤ 1 s blocked for async on Qwen3-8B / 4 GPUs.

Usage:
  python benchmarks/checkpoint.py [--size 8B] [--nproc 4] [--seq 16384] [--saves 3] [--dir /fast/disk]
  python benchmarks/checkpoint.py --cpu-smoke           # tiny model, gloo, 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sft import BUILDERS, base_config, write_rows  # noqa: E402


def _max_over_ranks(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _progress(first: str):
    """Print ``first`` and return a printer for the next figures, on rank 0 and flushed at once: a run cut off at
    its time limit still shows what it measured."""
    import torch.distributed as dist

    def report(line: str) -> None:
        if dist.get_rank() == 0:
            print(f"[checkpoint bench] {line}", flush=True)

    report(first)
    return report


def _drop(path: Path) -> None:
    """Delete a measured checkpoint so the next one never shares the disk with it (8B + AdamW ≈ 100 GB each)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def run_worker(ns: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.sft import SFTTrainer

    work = Path(ns.work)
    cfg = base_config(ns, work, json.loads((work / "shards.json").read_text())["sft"])
    # one checkpoint at a time (each is deleted once measured): the host-memory guard counts it and the next
    cfg.update(auto_resume=True, checkpoint_steps_for_auto_resume=10**9, keep_last_n_checkpoints=1)
    if ns.dir:
        cfg["output_dir"] = str(Path(ns.dir) / "ckpt-bench-run")
    trainer = SFTTrainer(cfg)
    dev = trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    trainer.train_loader.set_epoch(0)
    it = iter(trainer.train_loader)

    def step() -> float:
        batches = trainer._micro_batches(it)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        trainer.train_step(batches)
        trainer.state.step += 1
        sync()
        return _max_over_ranks(time.perf_counter() - t0, dev)

    for i in range(ns.warmup):
        step()
        if i == 0:  # what the trainer does after its first step: host buffers allocated in the background
            trainer.checkpointer.prepare(trainer.checkpoint_state_dict())
    plain = [step() for _ in range(ns.steps)]
    ckpt = trainer.checkpointer
    ckpt.prepare(trainer.checkpoint_state_dict())  # the save mode the host memory allows (host_memory.py)
    mode = "async" if ckpt.async_save else "sync (host memory)"
    report = _progress(f"{ns.steps} plain steps, median {statistics.median(plain):.3f} s; saves are {mode}")
    async_blocked, persisted = [], []
    for i in range(ns.saves):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        trainer.save_checkpoint()        # stage (device -> pinned host) + hand the write to a thread
        sync()
        async_blocked.append(_max_over_ranks(time.perf_counter() - t0, dev))
        step_during_write = step()       # a training step while the write runs
        ckpt.wait()
        persisted.append(_max_over_ranks(time.perf_counter() - t0, dev))
        plain.append(step_during_write)
        report(f"save {i + 1}/{ns.saves} ({mode}): blocked {async_blocked[-1]:.3f} s, persisted after "
               f"{persisted[-1]:.3f} s, step during the write {step_during_write:.3f} s")
        _drop(ckpt.root / f"step_{trainer.state.step - 1}")
    ckpt.async_save = False
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    trainer.save_checkpoint()
    sync_blocked = _max_over_ranks(time.perf_counter() - t0, dev)
    report(f"synchronous save: blocked {sync_blocked:.3f} s")
    last = ckpt.root / f"step_{trainer.state.step}"
    size = sum(f.stat().st_size for f in last.iterdir()) if dist.get_rank() == 0 else 0
    result = {"plain_step_s": statistics.median(plain[: ns.steps]),
              "step_during_async_write_s": statistics.median(plain[ns.steps:]) if ns.saves else None,
              "async_first_blocked_s": async_blocked[0] if async_blocked else None,
              "async_blocked_s": statistics.median(async_blocked[1:] or async_blocked),
              "async_blocked_all_s": async_blocked,
              "async_until_persisted_s": statistics.median(persisted), "sync_blocked_s": sync_blocked,
              "checkpoint_gib": size / 2**30, "world_size": trainer.world_size, "save_mode": mode}
    if dist.get_rank() == 0:
        (work / "result_checkpoint.json").write_text(json.dumps(result, indent=2))
    trainer.close()
    if ns.dir and dist.get_rank() == 0:
        shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8B", choices=sorted(BUILDERS))
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--dir", help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--json")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    ns = p.parse_args()
    # fields base_config reads
    ns.loss, ns.ac, ns.sp, ns.chunk, ns.no_compile, ns.tokenizer = "chunked", "full", 1, 4096, False, None
    if ns.cpu_smoke:
        ns.nproc, ns.seq, ns.steps, ns.warmup, ns.saves, ns.chunk = 2, 128, 2, 1, 2, 128
    if ns.worker:
        run_worker(ns)
        return
    work = Path(tempfile.mkdtemp(prefix="mirotrain-ckpt-bench-"))
    rows = ns.nproc * (ns.warmup + ns.steps + 2 * ns.saves + 1)
    shard = write_rows(work / "shards", rows, ns.seq, 1, 512 if ns.cpu_smoke else 151936)
    (work / "shards.json").write_text(json.dumps({"sft": shard}))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={ns.nproc}", str(Path(__file__).resolve()), "--worker",
           "--work", str(work), "--size", ns.size, "--seq", str(ns.seq), "--steps", str(ns.steps),
           "--warmup", str(ns.warmup), "--saves", str(ns.saves)] + (["--cpu-smoke"] if ns.cpu_smoke else []) + \
        (["--dir", ns.dir] if ns.dir else [])
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    result = json.loads((work / "result_checkpoint.json").read_text())
    result["config"] = {"size": "tiny" if ns.cpu_smoke else ns.size, "nproc": ns.nproc, "seq": ns.seq}
    print(json.dumps(result, indent=2))
    print(f"\nstep blocked by {result['save_mode']} save: {result['async_blocked_s']:.3f} s (target <= 1 s; first save "
          f"{result['async_first_blocked_s']:.3f} s, {ns.warmup + ns.steps - 1} steps after the buffers were "
          f"requested); by sync save: "
          f"{result['sync_blocked_s']:.3f} s; async persisted after {result['async_until_persisted_s']:.3f} s; "
          f"checkpoint {result['checkpoint_gib']:.2f} GiB")
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
